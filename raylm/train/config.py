"""Config sections shared by the training stages (``raylm pretrain``, ``sft``, ``reward``, ``dpo``,
and RLHF's policy).

The defaults fit a 2-core laptop with the ``debug`` model; the fine-tuning stages override the ones
that differ (lower LR, fewer steps)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.config import Section


class TrainConfig(Section):
    steps: int = Field(default=200, ge=1)  # optimizer steps
    batch_size: int = Field(default=8, ge=1)  # sequences per data-parallel rank per micro-batch
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    seq_len: int = Field(default=256, ge=2)  # tokens per training sequence
    mixed_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast compute over fp32 master weights
    activation_checkpointing: Literal["off", "selective", "full"] = "off"  # recompute activations in backward
    compile: bool = False  # torch.compile each block
    deterministic: bool = False  # deterministic kernels: a rerun (or a resumed run) reproduces exactly
    log_every: int = Field(default=10, ge=1)  # steps between console lines and logged metrics
    eval_every: int = Field(default=50, ge=0)  # 0: no validation
    eval_batches: int = Field(default=8, ge=1)  # validation batches per evaluation
    checkpoint_every: int = Field(default=50, ge=1)  # steps between checkpoints reported to Ray Train
    keep_checkpoints: int = Field(default=2, ge=1)  # the newest N are kept, older ones deleted
    max_failures: int = Field(default=3, ge=-1)  # worker-group restarts from the last checkpoint; -1: unlimited
    resume: bool = True  # False: a fresh run even if this output_dir holds checkpoints of an earlier one
    # Fault injection (tests, failure drills): rank `fail_rank` SIGKILLs itself before step `fail_at_step`.
    fail_at_step: int | None = Field(default=None, ge=1)
    # the rank that kills itself at fail_at_step (must be below parallel.num_workers)
    fail_rank: int = Field(default=1, ge=0)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` (e.g. --set ...=off) as false


class OptimConfig(Section):
    lr: float = Field(default=3e-3, gt=0)  # peak learning rate (AdamW), after warmup
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = Field(default=20, ge=0)  # linear warmup from 0, then cosine decay
    weight_decay: float = Field(default=0.1, ge=0)  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    eps: float = Field(default=1e-8, gt=0)  # AdamW denominator epsilon
    grad_clip: float = Field(default=1.0, ge=0)  # max global grad norm; 0: no clipping


class ParallelConfig(Section):
    num_workers: int = Field(default=2, ge=1)  # Ray Train workers (ranks)
    cpus_per_worker: int = Field(default=1, ge=1)  # also each worker's torch thread count
    use_gpu: bool = False  # one GPU per worker, NCCL; else CPU and gloo
    # Custom Ray resources each worker asks for: placement on a node type, e.g. {train_node: 0.01}
    # with the cluster configs of cluster/ (GPU nodes carry `train_node`, CPU nodes `data_node`).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    dp_shard: int = -1  # FSDP2 shard degree; -1: num_workers / dp_replicate
    dp_replicate: int = Field(default=1, ge=1)  # HSDP replica groups
    # True: ZeRO-3 (each block's parameters are gathered for its forward and again for its backward).
    # False: ZeRO-2-style: they stay gathered from forward to backward (one all-gather per block and
    # step instead of two, for whole parameters in memory during the step); gradients and optimizer
    # state stay sharded either way.
    fsdp_reshard_after_forward: bool = True
    tp: int = Field(default=1, ge=1)  # tensor-parallel degree (attention heads, MLP hidden units)
    ep: int = Field(default=1, ge=1)  # expert-parallel degree for MoE: 1 or dp_shard (experts over the dp ranks)
    cp: int = Field(default=1, ge=1)  # context-parallel degree: each sequence split over cp ranks
    pp: int = Field(default=1, ge=1)  # pipeline-parallel degree: the blocks split into pp stages
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"  # pipeline schedule
    pp_microbatches: int = Field(default=2, ge=1)  # micro-batches per batch_size batch in the pipeline

    @model_validator(mode="after")
    def _degrees(self):
        others = self.pp * self.dp_replicate * self.cp * self.tp
        shard = self.dp_shard if self.dp_shard != -1 else self.num_workers // others
        if shard < 1 or shard * others != self.num_workers:
            raise ValueError(f"dp_shard: pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x "
                             f"cp={self.cp} x tp={self.tp} does not equal num_workers={self.num_workers}")
        return self


class FreezeConfig(Section):
    """Fine-tuning: train only some blocks (plus the final norm and the head)."""

    train_layers: int | None = Field(default=None, ge=0)  # None: full fine-tuning
    train_from: Literal["last", "early", "intermediate"] = "last"  # which train_layers blocks train
