"""The one training engine: what every rank does whatever it trains, for the Ray Train stages
(pretraining, SFT, reward model, DPO: the one loop of ``actors/train/train_worker.py``) and for RLHF's
policy and critic trainer groups (``actors/trainer_group.py``) alike.

``build_model`` makes the model: a fresh seeded one or a Hugging Face checkpoint, with or without
a scalar head, frozen by depth, with PEFT applied from outside. ``Engine`` then owns it on one
rank: parallelism (pipeline stage, tensor / context / expert parallel, FSDP2), AdamW and the
warmup-cosine schedule, one optimizer step (gradient clipping across tp / pp / ep, bf16 autocast
over fp32 master weights), sharded DCP checkpoints and resume, and the final export to Hugging
Face and PEFT formats. The objectives are loss functions in ``raylm.train.losses``, fed their
batches by ``raylm.train.objectives`` (Ray Train stages) or the PPO trainers' ``update`` (RLHF).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

import torch
from torch import nn

from raylm.distributed import checkpoint as ckpt
from raylm.distributed.expert_parallel import scale_expert_grads
from raylm.distributed.parallel_dims import ParallelDims
from raylm.distributed.parallelize import clean_state_dict_key, parallelize, parallelize_transformers
from raylm.distributed.pipeline_parallel import attach_aux_loss, build_schedule, gather_stage_states, run_pipeline, split_stage
from raylm.distributed.pipeline_parallel import clip_grad_norm_ as clip_pipeline_grad_norm_
from raylm.distributed.tensor_parallel import clip_grad_norm_ as clip_mixed_grad_norm_
from raylm.distributed.tensor_parallel import unpermute_state_dict
from raylm.train.optim import build_optimizer, build_scheduler
from raylm.peft.config import PeftConfig
from raylm.train.losses import token_cross_entropy
from raylm.train.config import OptimConfig

# ---- the model -------------------------------------------------------------------------------


def build_model(*, config: dict | None = None, checkpoint: str | None = None, scalar_head: bool = False,
                seed: int = 0, train_layers: int | None = None, train_from: str = "last",
                peft: PeftConfig | None = None, implementation: str = "raylm") -> nn.Module:
    """The same full weights on every rank (a fresh model from ``config``, seeded, or the
    ``checkpoint``), frozen by depth if ``train_layers`` is set, with ``peft`` applied (LoRA /
    QLoRA, bottleneck adapters, a soft prompt). Sharding comes after, in ``Engine``.
    ``implementation="transformers"``: the checkpoint through transformers' own module (none of the
    options that reach into raylm's blocks; the stage config refused them)."""
    from raylm.models.config import TransformerConfig
    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.models.transformer import Transformer

    if implementation == "transformers":
        from raylm.train.transformers_model import load_transformers_model

        if scalar_head or train_layers is not None or (peft is not None and peft.method != "none"):
            raise ValueError("implementation transformers: a language model only, no freezing by depth or PEFT")
        return load_transformers_model(checkpoint)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, scalar_head=scalar_head)
    else:
        model = Transformer(TransformerConfig(**config))
        model.init_weights(seed=seed)
    backbone = model.model if scalar_head else model
    freeze_by_depth(backbone, train_layers, train_from)
    if scalar_head:
        model.score.requires_grad_(True)  # the head always trains
    if peft is not None and peft.method != "none":
        from raylm.peft.lora import apply_peft

        apply_peft(model, peft, seed=seed)  # every rank: the same initial adapter
    return model


def freeze_by_depth(model: nn.Module, train_layers: int | None, where: str = "last") -> None:
    """Train only ``train_layers`` blocks plus the final norm and output head (0: the head on frozen
    features): the last ones (``where="last"``), the first (``"early"``) or the middle ones
    (``"intermediate"``). With tied embeddings the head is the embedding matrix, so it trains too."""
    if train_layers is None:
        return
    n_layers = len(model.layers)
    if not 0 <= train_layers <= n_layers:
        raise ValueError(f"train_layers: {train_layers} is not between 0 and the model's {n_layers} layers")
    start = {"last": n_layers - train_layers, "early": 0, "intermediate": (n_layers - train_layers) // 2}[where]
    model.requires_grad_(False)
    for name in list(model.layers)[start:start + train_layers]:
        model.layers[name].requires_grad_(True)
    model.norm.requires_grad_(True)
    if model.output is not None:
        model.output.requires_grad_(True)


# ---- one rank's training state ------------------------------------------------------------------


class Engine:
    """One rank's sharded model, optimizer and LR schedule.

    ``steps`` is the run's length for the warmup-cosine schedule (None: the constant learning rate
    RLHF uses). With ``dims.pp > 1`` the model is this rank's pipeline stage and ``pipeline_lm``
    runs the schedule over ``pp_microbatches`` micro-batches of ``batch_shape`` (batch, seq).
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, device: torch.device, optim: OptimConfig,
                 steps: int | None = None, *, mixed_precision: str = "fp32", activation_checkpointing: str = "off",
                 compile: bool = False, reshard_after_forward: bool = True, grad_accum: int = 1,
                 pp_schedule: str = "1f1b", pp_microbatches: int = 1, batch_shape: tuple[int, int] | None = None,
                 peft: PeftConfig | None = None, base_checkpoint: str | None = None):
        self.dims, self.device, self.optim = dims, device, optim
        self.peft = peft if peft is not None and peft.method != "none" else None
        self.base_checkpoint = base_checkpoint  # what a PEFT export names as its base
        self.config = model.config  # raylm's TransformerConfig, or transformers' config
        from raylm.train.transformers_model import TransformersCausalLM

        self.transformers = isinstance(model, TransformersCausalLM)
        self.is_moe = not self.transformers and self.config.is_moe
        self.scalar_head = hasattr(model, "score")
        self.autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
        model = model.to(device)
        self.pp_rank = dims.pp_rank(torch.distributed.get_rank()) if dims.pp > 1 else 0
        if dims.pp > 1:  # this rank's blocks of the whole (identically initialised) model
            split_stage(model, dims.pp, self.pp_rank)
        self.model = model
        self._shard(activation_checkpointing, compile, reshard_after_forward)
        self.pipeline = None
        self.loss_scale = {"value": 1.0}  # the pipeline's loss multiplier, set per micro-batch group
        if dims.pp > 1:
            scale = self.loss_scale

            def pipeline_loss(logits, labels):  # the schedule calls it once per micro-batch
                return token_cross_entropy(logits, labels) * scale["value"]

            self.pipeline = build_schedule(model, self.pp_rank, dims.pp, dims.pp_mesh.get_group(), device,
                                           pp_microbatches, pipeline_loss,
                                           microbatch=(batch_shape[0] // pp_microbatches, batch_shape[1] // dims.cp),
                                           dim=self.config.dim, vocab_size=self.config.vocab_size, kind=pp_schedule)
            if self.is_moe:  # each micro-batch's auxiliary loss, averaged over the step's micro-batches
                attach_aux_loss(model, {"value": 1.0 / (grad_accum * pp_microbatches)})
        # foreach cannot mix DTensors and plain tensors (tensor and expert parallel leave both)
        self.optimizer = build_optimizer(model, optim.lr, optim.weight_decay, tuple(optim.betas), optim.eps,
                                         foreach=dims.tp == dims.ep == 1)
        self.scheduler = (build_scheduler(self.optimizer, optim.warmup_steps, steps, optim.min_lr_ratio)
                          if steps is not None else None)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)  # a DTensor's numel is its global size
        model.train()

    def _shard(self, activation_checkpointing: str, compile: bool, reshard_after_forward: bool) -> None:
        """Parallelism on the transformer. A scalar-head model's backbone is entered through
        ``hidden_states`` (not ``forward``), so FSDP2 is told to hook that method too, and the outer
        module (the score head) is sharded last as the root."""
        model, dims = self.model, self.dims
        if self.transformers:
            parallelize_transformers(model, dims, activation_checkpointing, reshard_after_forward)
            return
        backbone = model.model if self.scalar_head else model
        parallelize(backbone, dims, activation_checkpointing, compile, reshard_after_forward)
        if backbone is model or not (dims.dp_size > 1 or dims.tp == 1):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        register_fsdp_forward_method(backbone, "hidden_states")
        fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
                    reshard_after_forward=reshard_after_forward)

    # -- forward and backward --

    def autocast(self):
        """bf16 compute over the fp32 master weights when mixed precision is on."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def sync_gradients(self, sync: bool) -> None:
        """FSDP2: reduce-scatter after the last micro-batch of a step only."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(sync)

    def lm_loss_sum(self, tokens, labels, positions=None, attn_mask=None) -> torch.Tensor:
        """The summed next-token cross-entropy of one batch (not a pipeline)."""
        with self.autocast():
            logits = self.model(tokens, positions, attn_mask)
        return token_cross_entropy(logits, labels)

    def pipeline_lm(self, tokens, labels, positions=None, attn_mask=None, scale: float = 1.0,
                    train: bool = True) -> list[torch.Tensor]:
        """Run the pipeline schedule (forward, and backward when ``train``) over one batch; each
        micro-batch's summed cross-entropy is multiplied by ``scale``. -> the last stage's scaled
        losses, [] on the other stages."""
        self.loss_scale["value"] = scale
        with self.autocast():
            return run_pipeline(self.pipeline, tokens, labels, self.pp_rank, self.dims.pp, train=train,
                                positions=positions, attn_mask=attn_mask)

    def step(self) -> tuple[torch.Tensor, float]:
        """Clip the gradients to ``optim.grad_clip`` (global norm across every parallel dimension),
        step the optimizer and the schedule, zero the gradients. -> (norm before clipping, the LR
        this step used)."""
        dims = self.dims
        if dims.ep > 1:
            scale_expert_grads([p for m in self.model.moe_layers() for p in (m.experts.w13, m.experts.w2)],
                               dims.dp_size, dims.cp_mesh.get_group() if dims.cp > 1 else None, dims.cp)
        max_norm = self.optim.grad_clip or math.inf
        if dims.pp > 1:
            grad_norm = clip_pipeline_grad_norm_(self.trainable, max_norm, dims.pp_mesh.get_group())
        elif dims.tp > 1 or dims.ep > 1:
            grad_norm = clip_mixed_grad_norm_(self.trainable, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    # -- checkpoints --

    def save(self, folder, rank: int, trainer_state: dict | None = None, rank_state: dict | None = None) -> None:
        """Collective: the model and optimizer shards (DCP), the schedule and ``trainer_state``
        (the same on every rank), and ``rank_state`` with this rank's RNG states."""
        state = dict(trainer_state or {})
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        ckpt.save(folder, rank, self.model, self.optimizer, state, dict(rank_state or {}))

    def load(self, folder, rank: int) -> tuple[dict, dict]:
        """Collective: the inverse of ``save``, into this engine. -> (trainer_state, rank_state)."""
        trainer_state, rank_state = ckpt.load(folder, rank, self.model, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(trainer_state["scheduler"])
        return trainer_state, rank_state

    # -- the weights --

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded weights (raylm names) on rank 0 (every stage's, merged, under
        pipeline parallelism), an empty dict elsewhere."""
        rank = torch.distributed.get_rank()
        if self.dims.pp > 1:
            state = gather_stage_states(ckpt.full_model_state_dict(self.model, on_every_rank=True),
                                        rank % self.dims.stage_size == 0, rank)
            state = state if rank == 0 else {}
        else:
            state = ckpt.full_model_state_dict(self.model)
        return {clean_state_dict_key(k): v for k, v in (state or {}).items()}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded parameters that train (with PEFT: only the adapters), raylm
        names, on every rank; the frozen base is not gathered."""
        out = {}
        for name, param in self.model.named_parameters():  # the same order on every rank
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                out[clean_state_dict_key(name)] = full.detach().cpu()
        return out

    def export(self, folder, tokenizer_file: str | None = None) -> Path | None:
        """Collective: write the current model from rank 0 as a Hugging Face checkpoint. With PEFT
        the adapter goes to ``<folder>/adapter`` (PEFT's format) and, where the method merges (LoRA),
        the merged model to ``folder``; bottleneck adapters and soft prompts stay adapters only.
        -> where the model (or the unmerged adapter) was written, on rank 0; None elsewhere."""
        from raylm.models.hf_checkpoint import save_checkpoint
        from raylm.models.transformer import Transformer, TransformerWithScalarHead

        state = self.full_state_dict()
        if torch.distributed.get_rank() != 0:
            return None
        cfg = self.config
        if self.transformers:  # the same family, written by transformers
            from raylm.train.transformers_model import save_transformers_checkpoint

            return save_transformers_checkpoint(cfg, state, folder, tokenizer_file)
        if self.peft is not None:
            from raylm.peft.lora import export_peft

            adapter = Path(folder) / "adapter"
            state = export_peft(state, cfg, self.peft, adapter, base=self.base_checkpoint)
            if state is None:
                return adapter
        if self.dims.tp > 1:  # tensor parallel stored the fused projections' rows in shard order
            if self.scalar_head:
                backbone = unpermute_state_dict({k.removeprefix("model."): v for k, v in state.items()}, cfg, self.dims.tp)
                state = {(k if k == "score.weight" else "model." + k): v for k, v in backbone.items()}
            else:
                state = unpermute_state_dict(state, cfg, self.dims.tp)
        plain = TransformerWithScalarHead(cfg) if self.scalar_head else Transformer(cfg)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "output.weight" and cfg.tie_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
        return Path(save_checkpoint(plain, folder, tokenizer_file=tokenizer_file))

    # -- what is logged about it --

    def optimizer_state_mb(self) -> float:
        return optimizer_state_bytes(self.optimizer) / 2**20


def optimizer_state_bytes(optimizer) -> int:
    """The optimizer's state tensors (AdamW: two moments per trainable weight, plus step counts);
    sharded ones (DTensors) count at their global size."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def memory_gb(device: torch.device) -> float:
    """This process's peak: GPU memory allocated, or resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s); other devices are measured.
DATASHEET_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device for MFU: the data sheet's for known GPUs, else measured once per
    device type with a large matmul and cached in ~/.cache/raylm/peak_flops.json."""
    name = device_name(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        for key, value in DATASHEET_PEAK_BF16.items():
            if key in name:
                return value
    cache = Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm")) / "peak_flops.json"
    key = f"{name} {dtype}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_matmul_flops(device, dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    return known[key]


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
