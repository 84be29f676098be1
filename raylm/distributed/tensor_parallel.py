"""Tensor parallelism (Megatron-style, DTensor ``parallelize_module``) for attention and the dense MLP.

Per block: the fused query/key/value and gate/up projections are column-parallel (each rank computes
its own heads and its own slice of the hidden layer), the output projections row-parallel (one
all-reduce after attention, one after the MLP). Embeddings, norms, the router and the head stay
replicated. MoE feed-forwards are left to expert parallelism, so only their attention is split.

The fused weights hold [q | k | v] and [gate | up] one after the other, while a column-parallel
shard is one contiguous block of rows. So before sharding, their rows are reordered to
[q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and [gate_0 up_0 | gate_1 up_1 | ...]: every rank's block is then a
self-contained slice that the unchanged model code splits as usual. ``unpermute_state_dict`` undoes
it for the Hugging Face export.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from raylm.models.config import TransformerConfig


def check_tp(cfg: TransformerConfig, tp: int) -> None:
    if cfg.n_kv_heads % tp or cfg.n_heads % tp:
        raise ValueError(f"tp: degree {tp} must divide n_heads ({cfg.n_heads}) and n_kv_heads ({cfg.n_kv_heads})")
    if not cfg.is_moe and cfg.ffn_dim % tp:
        raise ValueError(f"tp: degree {tp} must divide ffn_dim ({cfg.ffn_dim})")
    if cfg.qk_norm is not None:
        # Each rank holds some heads: the norm weights' gradients would need a sum over ranks (per-head
        # norms), or the norm itself statistics over all of them (OLMo2's whole-projection norm).
        raise ValueError(f"tp: models with qk_norm ({cfg.qk_norm!r}: {cfg.hf_model_type or 'raylm'}) are not "
                         "tensor-parallel in raylm yet; use FSDP / data, pipeline or context parallelism")


def qkv_row_order(cfg: TransformerConfig, tp: int) -> torch.Tensor:
    """Row index order of the fused qkv weight that makes rank r's contiguous block [q_r, k_r, v_r]."""
    d = cfg.head_dim
    q, kv = cfg.n_heads * d, cfg.n_kv_heads * d
    rows = torch.arange(q + 2 * kv)
    q_rows, k_rows, v_rows = rows[:q].chunk(tp), rows[q:q + kv].chunk(tp), rows[q + kv:].chunk(tp)
    return torch.cat([torch.cat([q_rows[r], k_rows[r], v_rows[r]]) for r in range(tp)])


def gate_up_row_order(hidden: int, tp: int) -> torch.Tensor:
    rows = torch.arange(2 * hidden)
    gate, up = rows[:hidden].chunk(tp), rows[hidden:].chunk(tp)
    return torch.cat([torch.cat([gate[r], up[r]]) for r in range(tp)])


def _fused_weights(cfg: TransformerConfig, tp: int):
    """(name suffix, row order) of every fused weight that tensor parallelism reorders."""
    yield "attention.wqkv.weight", qkv_row_order(cfg, tp)
    if cfg.attention_bias:  # the q/k/v biases go with their rows
        yield "attention.wqkv.bias", qkv_row_order(cfg, tp)
    if not cfg.is_moe:
        yield "feed_forward.w13.weight", gate_up_row_order(cfg.ffn_dim, tp)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    cfg, tp = model.config, tp_mesh.size()
    check_tp(cfg, tp)
    orders = dict(_fused_weights(cfg, tp))
    with torch.no_grad():
        for block in model.layers.values():
            for suffix, order in orders.items():
                module_name, param_name = suffix.rsplit(".", 1)
                param = getattr(block.get_submodule(module_name), param_name)
                param.copy_(param[order])
            plan = {"attention.wqkv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
            if not cfg.is_moe:
                plan.update({"feed_forward.w13": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()})
            parallelize_module(block, tp_mesh, plan)


def unpermute_state_dict(state: dict[str, torch.Tensor], cfg: TransformerConfig, tp: int) -> dict:
    """The full (gathered) state dict of a tensor-parallel model -> the plain model's row order."""
    out = dict(state)
    for suffix, order in _fused_weights(cfg, tp):
        inverse = torch.argsort(order)
        for name, value in state.items():
            if name.endswith(suffix):
                out[name] = value[inverse]
    return out


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping over a mix of plain tensors and DTensors on different meshes
    (tensor-parallel blocks beside replicated norms): each parameter's norm is reduced over its own
    mesh, then they are combined here."""
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.item())  # a Python scalar multiplies plain tensors and DTensors alike
    return total
