"""Sparse Mixture-of-Experts feed-forward: a top-k token-choice router, routed SwiGLU experts
held as stacked weights (so expert parallelism can shard them along the expert dimension), an
optional sigmoid-gated shared expert, and the load-balancing and router z-losses.

Dispatch sorts the (token, expert) assignments by expert and runs each expert on its slice:
dropless by default; with ``capacity_factor`` each expert takes at most
``ceil(capacity_factor * tokens * top_k / n_experts)`` assignments, earliest tokens first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .feed_forward import FeedForward


@dataclass
class Routing:
    weights: torch.Tensor  # [T, k] combine weights of the chosen experts
    experts: torch.Tensor  # [T, k] chosen expert ids
    probs: torch.Tensor  # [T, E] router softmax (float32)
    logits: torch.Tensor  # [T, E] router logits (float32)


class TopKRouter(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, norm_topk: bool):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.top_k, self.norm_topk = top_k, norm_topk

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, experts, probs, logits)


class GroupedExperts(nn.Module):
    """n_experts SwiGLU MLPs with weights stacked as [E, dim, 2*hidden] and [E, hidden, dim]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: assignments grouped by expert, ``counts[e]`` rows for expert e (local experts)."""
        outputs = []
        for e, rows in enumerate(x_sorted.split(counts, dim=0)):
            if rows.shape[0] == 0:
                continue
            gate, up = (rows @ self.w13[e]).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ self.w2[e])
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs, dim=0)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: n_experts * sum_e f_e * P_e, where f_e is the fraction of
    assignments routed to e and P_e its mean router probability. 1.0 when perfectly balanced."""
    counts = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router logits (keeps them small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.load_balance_coef, self.router_z_coef = cfg.load_balance_coef, cfg.router_z_coef
        self.router = TopKRouter(cfg.dim, cfg.n_experts, cfg.top_k, cfg.router_norm_topk)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim)
        self.shared_expert = None
        if cfg.n_shared_experts:
            self.shared_expert = FeedForward(cfg.dim, cfg.n_shared_experts * cfg.moe_ffn_dim)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
        # Filled by every forward, for the trainer's loss and metrics.
        self.aux_loss: torch.Tensor | float = 0.0
        self.load_balance_loss: torch.Tensor | float = 0.0
        self.z_loss: torch.Tensor | float = 0.0
        self.tokens_per_expert = torch.zeros(cfg.n_experts, dtype=torch.long)
        self.dropped_tokens = 0

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def dispatch(self, routing: Routing, n_tokens: int):
        """-> (token index of each kept assignment grouped by expert, its combine weight, per-expert
        kept counts). The sort is stable, so within an expert earlier tokens come first."""
        flat_experts = routing.experts.flatten()
        token_index = torch.arange(n_tokens, device=flat_experts.device).repeat_interleave(self.top_k)
        order = torch.argsort(flat_experts, stable=True)
        sorted_experts = flat_experts[order]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        self.tokens_per_expert = counts.detach()
        token_index, weights = token_index[order], routing.weights.flatten()[order]
        capacity = self.capacity(n_tokens)
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
            keep = rank_in_expert < capacity
            token_index, weights, sorted_experts = token_index[keep], weights[keep], sorted_experts[keep]
            counts = counts.clamp(max=capacity)
            self.dropped_tokens = int((~keep).sum())
        return token_index, weights, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.router(x)
        token_index, weights, counts = self.dispatch(routing, x.shape[0])
        routed = self.experts(x[token_index], counts.tolist())
        out = torch.zeros_like(x).index_add_(0, token_index, (routed * weights[:, None]).to(x.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        self.load_balance_loss = load_balancing_loss(routing.probs, routing.experts, self.n_experts)
        self.z_loss = router_z_loss(routing.logits)
        self.aux_loss = self.load_balance_coef * self.load_balance_loss + self.router_z_coef * self.z_loss
        return out.reshape(shape)
