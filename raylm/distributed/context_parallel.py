"""Context parallelism: one long sequence split across the ranks of a ``cp`` group.

Each rank holds a contiguous chunk of every sequence of the batch (its queries), and attention
gathers the keys and values of all chunks (all-gather attention): every query attends to the
whole sequence under an explicit mask of its global position, so causality and document
boundaries hold across the split. Everything else in a block (projections, MLP, norms, RoPE with
global positions) is per token and needs nothing from the other ranks.

Applied from outside the model: ``apply_context_parallel`` swaps each ``Attention.sdpa`` for the
gathering one, and ``shard_sequence`` cuts a batch into this rank's chunk with its positions and
mask. Backward sums the gradients of the gathered keys and values over the group and keeps the
local chunk's.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from raylm.models.transformer import (Attention, document_causal_mask, document_positions,
                                      scaled_dot_product_attention)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` in rank order; backward: the summed gradient's local chunk."""

    @staticmethod
    def forward(ctx, x, group, dim):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.dim, ctx.world, ctx.rank = group, dim, world, dist.get_rank(group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter; the sum is the same
        return grad.chunk(ctx.world, dim=ctx.dim)[ctx.rank].contiguous(), None, None


def gather_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return _GatherSequence.apply(x, group, dim)


def context_parallel_attention(q, k, v, attn_mask=None, *, group):
    """q: this rank's queries [B, H, T/cp, D]; k, v: this rank's chunk, gathered here to the whole
    sequence. ``attn_mask`` [B or 1, 1, T/cp, T] says which keys each local query sees."""
    if attn_mask is None:
        raise ValueError("context-parallel attention needs each local query's mask over the whole sequence "
                         "(raylm.distributed.context_parallel.shard_sequence builds it)")
    k, v = gather_sequence(k, group, dim=2), gather_sequence(v, group, dim=2)
    return scaled_dot_product_attention(q, k, v, attn_mask)


def apply_context_parallel(model: nn.Module, cp_mesh) -> None:
    group = cp_mesh.get_group()
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa = partial(context_parallel_attention, group=group)


def shard_sequence(tokens: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None,
                   cp_rank: int, cp: int) -> tuple:
    """This rank's chunk of a [B, T] batch: (tokens, labels, positions, attn_mask), with positions
    and mask those of the chunk within the whole sequence (causal, and no attention across packed
    documents when ``document_ids`` are given)."""
    batch, seq = tokens.shape
    if seq % cp:
        raise ValueError(f"sequence length {seq} is not divisible by the context-parallel degree {cp}")
    chunk = slice(cp_rank * (seq // cp), (cp_rank + 1) * (seq // cp))
    if document_ids is None:
        index = torch.arange(seq, device=tokens.device)
        positions = index[chunk].expand(batch, -1)
        mask = (index[None, :] <= index[chunk, None])[None, None]
    else:
        positions = document_positions(document_ids)[:, chunk]
        mask = document_causal_mask(document_ids)[:, :, chunk]
    return tokens[:, chunk], labels[:, chunk], positions, mask
