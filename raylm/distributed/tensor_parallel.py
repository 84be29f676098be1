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

Query/key RMSNorms (``qk_norm``) run on each rank's own heads. Per-head norms (Qwen3) keep their
weight replicated; as each rank applies it to its heads only, its gradient is summed over the group.
OLMo2's norm over the whole projection needs the mean square over every head: each rank all-reduces
its sum of squares (one number per token, where vLLM all-gathers the projections), and holds the
slice of the weight that scales its own heads, sharded like the rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from raylm.models.config import TransformerConfig


def check_tp(cfg: TransformerConfig, tp: int) -> None:
    if cfg.n_kv_heads % tp or cfg.n_heads % tp:
        raise ValueError(f"tp: degree {tp} must divide n_heads ({cfg.n_heads}) and n_kv_heads ({cfg.n_kv_heads})")
    if not cfg.is_moe and cfg.ffn_dim % tp:
        raise ValueError(f"tp: degree {tp} must divide ffn_dim ({cfg.ffn_dim})")


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


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a weight each rank applies to
    its own part of the activations)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadRMSNormOnLocalHeads(nn.Module):
    """A per-head query or key RMSNorm (Qwen3) on this rank's heads: the weight replicated, its
    gradient summed over the tensor-parallel group."""

    def __init__(self, norm: nn.RMSNorm, group):
        super().__init__()
        self.weight, self.eps, self.group = norm.weight, norm.eps, group

    def forward(self, x):
        weight = _SumGradOverGroup.apply(self.weight, self.group)
        return nn.functional.rms_norm(x, weight.shape, weight, self.eps)


class ProjectionRMSNormOverShards(nn.Module):
    """OLMo2's query or key RMSNorm over the whole projection, whose columns are split over the
    tensor-parallel group: the mean square is summed over the ranks (differentiably: its backward
    sums every rank's gradient of it), the weight sharded with the columns it scales."""

    def __init__(self, norm: nn.RMSNorm, mesh: DeviceMesh):
        super().__init__()
        self.width, self.eps, self.group = norm.weight.shape[0], norm.eps, mesh.get_group()
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Shard(0)]),
                                   requires_grad=norm.weight.requires_grad)

    def forward(self, x):
        squares = x.float().pow(2).sum(-1, keepdim=True)
        mean_square = dist_autograd.all_reduce(squares, group=self.group) / self.width
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
        return (x.float() * torch.rsqrt(mean_square + eps)).to(x.dtype) * self.weight.to_local()


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
            attention = block.attention
            if cfg.qk_norm == "head":
                attention.q_norm = HeadRMSNormOnLocalHeads(attention.q_norm, tp_mesh.get_group())
                attention.k_norm = HeadRMSNormOnLocalHeads(attention.k_norm, tp_mesh.get_group())
            elif cfg.qk_norm == "full":  # q_r's columns are the r-th contiguous block: so is its weight slice
                attention.q_norm = ProjectionRMSNormOverShards(attention.q_norm, tp_mesh)
                attention.k_norm = ProjectionRMSNormOverShards(attention.k_norm, tp_mesh)


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
