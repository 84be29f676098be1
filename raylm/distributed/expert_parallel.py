"""Expert parallelism for MoE layers: each rank keeps ``n_experts / ep`` experts and tokens travel to
the rank that owns their expert and back with two all-to-alls per layer.

Applied from outside: each ``GroupedExperts`` keeps its parameter names (so checkpoints and the
Hugging Face export are unchanged) but its weights become DTensors sharded on the expert dim over
the data-parallel ranks, and its class becomes ``ExpertParallelExperts``, whose forward wraps the
unchanged per-expert computation in the token exchange. The experts borrow the data-parallel ranks
(``ep == dp_shard``): every expert lives on exactly one rank, so FSDP2 leaves those weights alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard

from raylm.models.moe import GroupedExperts


class ExpertParallelExperts(GroupedExperts):
    ep_mesh: DeviceMesh

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: this rank's token assignments grouped by (global) expert, ``counts[e]`` for expert e."""
        group, ep = self.ep_mesh.get_group(), self.ep_mesh.size()
        n_local = self.w13.shape[0] // ep
        send_counts = torch.tensor(counts, dtype=torch.long, device=x_sorted.device).view(ep, n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # [source rank, local expert]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all_single_autograd(x_sorted.contiguous(), recv_splits, send_splits, group)
        # Arrivals are grouped by source rank, then expert; the experts want them grouped by expert.
        expert_of_row = torch.arange(n_local, device=x_sorted.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        # Same dtype on every rank whatever autocast did, or the return all-to-all would mismatch.
        local = self.local_forward(received[order], recv_counts.sum(0).tolist()).to(x_sorted.dtype)
        back = torch.empty_like(local)
        back[order] = local
        return all_to_all_single_autograd(back, send_splits, recv_splits, group)

    def local_forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs = []
        w13, w2 = self.w13.to_local(), self.w2.to_local()
        for e, chunk in enumerate(rows.split(counts, dim=0)):
            if chunk.shape[0]:
                gate, up = (chunk @ w13[e]).chunk(2, dim=-1)
                outputs.append((nn.functional.silu(gate) * up) @ w2[e])
        return torch.cat(outputs, dim=0) if outputs else rows.new_zeros(rows.shape)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Parameter]:
    """Shard every MoE layer's experts over ``ep_mesh``; returns the expert parameters (for FSDP2 to
    ignore and for the loop to rescale, see ``scale_expert_grads``)."""
    ep = ep_mesh.size()
    expert_params = []
    for moe in model.moe_layers():
        experts = moe.experts
        if experts.w13.shape[0] % ep:
            raise ValueError(f"ep: degree {ep} does not divide n_experts ({experts.w13.shape[0]})")
        for name in ("w13", "w2"):
            full = getattr(experts, name).detach()
            rank, n_local = ep_mesh.get_local_rank(), full.shape[0] // ep
            local = full[rank * n_local:(rank + 1) * n_local].clone()
            param = nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False))
            setattr(experts, name, param)
            expert_params.append(param)
        experts.__class__ = ExpertParallelExperts
        experts.ep_mesh = ep_mesh
    return expert_params


def scale_expert_grads(expert_params: list[nn.Parameter], dp_size: int, cp_group=None, cp: int = 1) -> None:
    """Every rank scales its loss by dp_size x cp for FSDP2's gradient average; expert gradients
    arrive summed over the ep ranks by the all-to-all instead of averaged (and, with context
    parallelism, each cp rank's experts saw only its chunk's tokens: summed over the cp group here),
    so they are divided here."""
    for param in expert_params:
        if param.grad is None:
            continue
        grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
        if cp_group is not None:
            dist.all_reduce(grad, group=cp_group)
        grad.div_(dp_size * cp)
