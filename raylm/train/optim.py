"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    fused: bool | None = None, foreach: bool = True) -> torch.optim.AdamW:
    """Weight decay on the 2-D (and expert 3-D) weights; none on norms and other vectors, as in GPT-2/Llama.
    Frozen parameters are left out, so freezing by depth costs no optimizer state."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    # foreach: one kernel per group on GPU; the fused path is not available on every backend.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else foreach)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))
