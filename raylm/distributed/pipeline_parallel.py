"""Pipeline parallelism: the blocks split into ``pp`` consecutive stages, one per rank of a pipeline
group, run by a ``torch.distributed.pipelining`` schedule (1F1B or GPipe) over micro-batches.

Applied from outside the model: ``split_stage`` keeps this rank's blocks of the whole model (built
and initialised as one, so every stage starts from the same weights as an unsplit run) and drops
the rest; the first stage keeps the embeddings, the last the final norm and the head. Blocks are a
``ModuleDict``, so a stage's parameters keep the names of the whole model and checkpoints and
exports merge stage by stage.

Scope: models with untied embeddings. The schedule passes one activation tensor from stage to stage;
per-token positions and the attention mask (packed fine-tuning documents, a context-parallel chunk)
are given to every stage, split into the same micro-batches. A Mixture-of-Experts stage's auxiliary
(load-balancing and router z) losses join the objective where they arise: ``attach_aux_loss`` makes
the stage's output carry their gradient back, as if they had been added to the last stage's loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Schedule = Literal["1f1b", "gpipe"]


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Consecutive blocks of ``stage``: as even as ``n_layers`` allows, earlier stages one more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def split_stage(model: nn.Module, pp: int, stage: int) -> nn.Module:
    """Keep ``stage``'s blocks of ``model`` (in place); the others, and the embeddings / norm / head
    that belong to other stages, are removed."""
    keep = {str(i) for i in stage_layers(len(model.layers), pp, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < pp - 1:
        model.norm = None
        model.output = None
    return model


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; backward also gives ``aux`` the gradient ``scale`` (d loss / d aux)."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(stage: nn.Module, scale: dict) -> None:
    """After each training forward of ``stage``, its MoE layers' summed ``aux_loss`` enters backward
    with weight ``scale["value"]`` (set per step: 1 / the forwards the step averages over)."""

    def hook(module, args, output):
        if not module.training:
            return output
        aux = module.moe_aux_loss()
        return _AttachAuxLoss.apply(output, aux, scale["value"]) if torch.is_tensor(aux) else output

    stage.register_forward_hook(hook)


def build_schedule(stage_module: nn.Module, stage: int, pp: int, group, device, n_microbatches: int,
                   loss_fn, microbatch: tuple[int, int], dim: int, vocab_size: int, kind: Schedule = "1f1b"):
    """The schedule that runs this rank's stage. Gradients are not divided by the number of
    micro-batches (``loss_fn`` carries the step's exact normalisation).

    ``microbatch`` (rows, tokens), ``dim`` and ``vocab_size`` give every stage its input and output
    shapes up front (token ids into the first stage, the residual stream between stages, logits out
    of the last). Left to infer them, the schedule runs a forward and backward per stage in turn at
    the first step, with blocking object exchanges between stages; the collectives inside a stage
    (the experts' all-to-alls, FSDP2's all-gathers) then interleave with those exchanges differently
    on the ranks of one stage, and pipeline x expert parallelism deadlocked."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rows, tokens = microbatch
    hidden = torch.empty(rows, tokens, dim, device="meta", requires_grad=True)  # its gradient travels back
    first_input = torch.empty(rows, tokens, dtype=torch.long, device="meta")
    logits = torch.empty(rows, tokens, vocab_size, device="meta", requires_grad=True)
    pipeline_stage = PipelineStage(stage_module, stage, pp, device, group=group,
                                   input_args=first_input if stage == 0 else hidden,
                                   output_args=logits if stage == pp - 1 else hidden)
    schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[kind]
    return schedule_cls(pipeline_stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def run_pipeline(schedule, tokens, labels, stage: int, pp: int, train: bool = True, positions=None,
                 attn_mask=None) -> list[torch.Tensor]:
    """One batch through the pipeline (forward and, when training, backward); the last stage
    returns the micro-batches' losses, the others an empty list. ``positions`` [B, T] and
    ``attn_mask`` [B or 1, 1, T, T'] go to every stage's blocks."""
    losses: list[torch.Tensor] = []
    args = (tokens,) if stage == 0 else ()
    target = labels if stage == pp - 1 else None
    kwargs = {}
    if positions is not None:
        kwargs["positions"] = positions.expand(tokens.shape[0], -1).contiguous()
    if attn_mask is not None:  # a mask shared by the batch is repeated so it splits into micro-batches
        kwargs["attn_mask"] = attn_mask.expand(tokens.shape[0], *attn_mask.shape[1:]).contiguous()
    if train:
        schedule.step(*args, target=target, losses=losses, **kwargs)
    else:
        schedule.eval(*args, target=target, losses=losses, **kwargs)
    return losses


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, pp_group) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: every stage's squared norm, summed over the
    pipeline group."""
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    if hasattr(local, "full_tensor"):
        local = local.full_tensor()
    squared = local.double() ** 2
    dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt().float()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def gather_stage_states(state: dict, is_stage_leader: bool, rank: int) -> dict | None:
    """Every stage's full weights merged on rank 0 (collective over all ranks; None elsewhere)."""
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(state if is_stage_leader else {}, parts, dst=0)
    if rank != 0:
        return None
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged
