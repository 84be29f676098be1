"""Parallelism applied to a raylm ``Transformer`` from outside, in torchtitan's order:
tensor parallel -> context parallel -> expert parallel -> activation checkpointing -> torch.compile
-> FSDP2.

The model's own code knows nothing of this: blocks are wrapped or sharded in place, and the state
dict keeps the names the Hugging Face adapter expects.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raylm.distributed.context_parallel import apply_context_parallel
from raylm.distributed.expert_parallel import apply_ep
from raylm.distributed.parallel_dims import ParallelDims
from raylm.distributed.tensor_parallel import apply_tp

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."

ActivationCheckpointing = Literal["off", "selective", "full"]


def apply_activation_checkpointing(model: nn.Module, mode: ActivationCheckpointing) -> None:
    """``full``: recompute every block's activations in backward; ``selective``: every other block
    (half the memory saving for about half the recompute). The wrapper's state-dict hook strips its
    prefix, so checkpoints keep the plain names."""
    if mode == "off":
        return
    every = 1 if mode == "full" else 2
    for i, (name, block) in enumerate(list(model.layers.items())):
        if i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                    preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own: repeated blocks share one compiled graph, and FSDP2's hooks
    stay outside the compiled regions."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: nn.Module, dims: ParallelDims, reshard_after_forward: bool = True,
               ignored_params: set | None = None, blocks: list[nn.Module] | None = None) -> None:
    """FSDP2 ``fully_shard`` per block (default: raylm's ``model.layers``), then the root (embeddings,
    final norm and the tied head).

    Parameters stay fp32 (the master weights); bf16 compute comes from autocast in the loop, so the
    policy keeps FSDP2's all-gathers and reduce-scatters in fp32 as well."""
    mesh = dims.fsdp_mesh
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    blocks = list(model.layers.values()) if blocks is None else blocks
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored_params,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored_params)


def parallelize(model: nn.Module, dims: ParallelDims, activation_checkpointing: ActivationCheckpointing = "off",
                compile: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    if dims.tp > 1:
        apply_tp(model, dims.tp_mesh)
    if dims.cp > 1:
        apply_context_parallel(model, dims.cp_mesh)
    expert_params = apply_ep(model, dims.ep_mesh) if dims.ep > 1 else []
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if dims.grad_average_size > 1 or dims.tp == 1:  # pure tensor parallelism has nothing for FSDP to shard over
        apply_fsdp(model, dims, reshard_after_forward, ignored_params=set(expert_params) or None)
    return model


def parallelize_transformers(model: nn.Module, dims: ParallelDims, activation_checkpointing: ActivationCheckpointing = "off",
                             reshard_after_forward: bool = True) -> nn.Module:
    """transformers' module (``raylm.train.transformers_model``): FSDP2 over its decoder blocks and
    data parallelism only, activation checkpointing through transformers' own switch."""
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(dims, key) > 1:
            raise ValueError(f"parallel.{key}: a model trained through transformers runs with data parallelism / "
                             "FSDP2 only")
    if activation_checkpointing == "full":
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif activation_checkpointing != "off":
        raise ValueError(f"train.activation_checkpointing: {activation_checkpointing} is raylm's; use full or off")
    apply_fsdp(model, dims, reshard_after_forward, blocks=model.blocks())
    return model


def clean_state_dict_key(key: str) -> str:
    """The parameter's name in the unwrapped model (no checkpoint/compile wrapper prefixes)."""
    return key.replace(CHECKPOINT_PREFIX, "").replace("_orig_mod.", "")
