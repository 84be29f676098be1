"""The Ray Train worker loop for preference training, and the reference model's log-probs.

Two objectives on one loop (``spec["objective"]``):

- ``reward``: a ``TransformerWithScalarHead`` started from a causal-LM checkpoint (fresh zero
  head) scores chosen and rejected answers; Bradley-Terry loss ``-log sigmoid(r_c - r_r - m)``.
- ``dpo``: a policy ``Transformer`` against a frozen reference whose log-probs were computed once,
  before training, by ``reference_logprobs`` (plain Ray tasks); sigmoid (DPO) or IPO loss.

The set-up is pretraining's: one process per rank, FSDP2 (and tensor parallel) applied from
outside the model, AdamW with warmup + cosine, gradient accumulation and clipping, sharded DCP
checkpoints reported to Ray Train (a replaced worker resumes from the last one), rank 0 logging to
MLflow and exporting the final model in Hugging Face format. Held-out pairs are scored before the
first step and every ``eval_every`` steps, so a run shows where it started and where it got to.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylm.actors.train_worker import (
    freeze_by_depth,
    memory_gb,
    optimizer_state_bytes,
    report_checkpoint,
    set_determinism,
)
from raylm.distributed import checkpoint as ckpt
from raylm.distributed.parallel_dims import ParallelDims
from raylm.distributed.parallelize import clean_state_dict_key, parallelize
from raylm.distributed.tensor_parallel import clip_grad_norm_ as clip_mixed_grad_norm_
from raylm.distributed.tensor_parallel import unpermute_state_dict
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import Transformer, TransformerWithScalarHead
from raylm.optim import build_optimizer, build_scheduler
from raylm.preference_data import IGNORE_INDEX, PairDataset
from raylm.tracking import Progress


# ---- the losses ------------------------------------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) (the margin asks for a wider gap)."""
    return -F.logsigmoid(chosen - rejected - margin)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> dict:
    """Per-pair DPO or IPO loss from summed response log-probs, with the implicit rewards.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r));
    sigmoid (DPO): -log sigmoid(beta * h); ipo: (h - 1 / (2 beta))^2."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss: unknown kind {kind!r} (sigmoid or ipo)")
    return {"loss": loss, "chosen_rewards": beta * chosen_ratio.detach(), "rejected_rewards": beta * rejected_ratio.detach()}


def sequence_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled positions of log p(label | prefix): [B]. Right padding needs no mask
    (causal attention never looks right), and its labels are -100."""
    logits = model(tokens).float()
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


# ---- the frozen reference ----------------------------------------------------------------------------

def reference_logprobs_chunk(checkpoint: str, pairs: list[dict], tokenizer_file: str, seq_len: int,
                             batch_size: int, threads: int = 1,
                             quantize: tuple[str, int, bool] | None = None) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected) of ``pairs`` under the model at ``checkpoint``
    (quantized first if ``quantize`` = (kind, block size, double quantization): QLoRA's base with
    the adapters off)."""
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).eval()
    if quantize is not None:
        from raylm.quantize import quantize_model

        quantize_model(model, *quantize)
    data = PairDataset(pairs, tokenizer_file, seq_len, shuffle=False)
    out = []
    with torch.no_grad():
        for batch in data.batches(batch_size):
            logps = sequence_logprobs(model, batch["tokens"], batch["labels"])
            n = len(batch["index"])
            out.append(torch.stack([logps[:n], logps[n:]], dim=1))
    return torch.cat(out)


def reference_logprobs(checkpoint: str, pairs: list[dict], tokenizer_file: str, seq_len: int, batch_size: int,
                       num_tasks: int, cpus_per_task: int = 1,
                       quantize: tuple[str, int, bool] | None = None) -> torch.Tensor:
    """The reference model's log-probs of every pair, once, as ``num_tasks`` Ray tasks over slices."""
    import ray

    task = ray.remote(num_cpus=cpus_per_task)(reference_logprobs_chunk)
    bounds = [round(i * len(pairs) / num_tasks) for i in range(num_tasks + 1)]
    refs = [task.remote(checkpoint, pairs[a:b], tokenizer_file, seq_len, batch_size, cpus_per_task, quantize)
            for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(ray.get(refs, timeout=3600))


# ---- the model ---------------------------------------------------------------------------------------

def build_model(spec: dict):
    """The reward model (backbone of the checkpoint + a scalar head, zero unless the checkpoint is
    already a reward model) or the policy; frozen by depth if asked."""
    if spec["objective"] == "reward":
        model = load_checkpoint(spec["init_checkpoint"], scalar_head=True)
        freeze_by_depth(model.model, spec.get("train_layers"))
        model.score.requires_grad_(True)
        return model
    model = load_checkpoint(spec["init_checkpoint"])
    freeze_by_depth(model, spec.get("train_layers"), spec.get("train_layers_from", "last"))
    if (spec.get("peft") or {}).get("method", "none") != "none":  # raylm.lora / bottleneck_adapter / prompt_tuning
        from raylm.lora import apply_peft
        from raylm.peft_config import PeftConfig

        apply_peft(model, PeftConfig(**spec["peft"]), seed=spec["seed"])
    return model


def shard_model(model, dims: ParallelDims, train: dict, reshard_after_forward: bool) -> None:
    """Pretraining's parallelize on the backbone. A reward model's backbone is entered through
    ``hidden_states`` (not ``forward``), so FSDP2 is told to hook that method too, and the outer
    module (the score head) is sharded last as the root."""
    backbone = model if isinstance(model, Transformer) else model.model
    parallelize(backbone, dims, train["activation_checkpointing"], train["compile"], reshard_after_forward)
    if backbone is model:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if dims.dp_size > 1 or dims.tp == 1:
        register_fsdp_forward_method(model.model, "hidden_states")
        fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
                    reshard_after_forward=reshard_after_forward)


def export_model(spec: dict, model, rank: int, tp: int) -> None:
    """Gather the full weights (collective) and write them from rank 0 as a Hugging Face folder."""
    state = ckpt.full_model_state_dict(model)
    if rank != 0:
        return
    state = {clean_state_dict_key(k): v for k, v in state.items()}
    if (spec.get("peft") or {}).get("method", "none") != "none":  # as `raylm sft`: hf/adapter, merged in hf/ if it merges
        from raylm.lora import export_peft
        from raylm.peft_config import PeftConfig

        folder = Path(spec["export_dir"]) / "adapter"
        state = export_peft(state, model.config, PeftConfig(**spec["peft"]), folder, base=spec.get("init_checkpoint"))
        if state is None:
            print(f"[{spec['stage']}] wrote the {spec['peft']['method']} weights to {folder}", flush=True)
            return
    scalar = spec["objective"] == "reward"
    if tp > 1:
        backbone = {k.removeprefix("model."): v for k, v in state.items()} if scalar else state
        backbone = unpermute_state_dict(backbone, model.config, tp)
        state = {("model." + k if scalar and k != "score.weight" else k): v for k, v in backbone.items()}
    plain = TransformerWithScalarHead(model.config) if scalar else Transformer(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "output.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"final export: missing {missing}, unexpected {unexpected}")
    save_checkpoint(plain, spec["export_dir"], tokenizer_file=spec.get("tokenizer_file"))
    print(f"[{spec['stage']}] wrote the final model to {spec['export_dir']}", flush=True)


# ---- one step's numbers ------------------------------------------------------------------------------

def pair_outputs(model, batch: dict, spec: dict, device, autocast_dtype, reference: torch.Tensor | None) -> dict:
    """Per-pair loss and what is logged about it, for one batch (chosen rows first, then rejected)."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    n = len(batch["index"])
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if spec["objective"] == "reward":
            scores = model.sequence_scores(tokens, batch["attention_mask"].to(device)).float()
            chosen, rejected = scores[:n], scores[n:]
            loss = bradley_terry_loss(chosen, rejected, batch["margin"].to(device))
            return {"loss": loss, "correct": agreement(chosen - rejected), "margin": (chosen - rejected).detach(),
                    "chosen": chosen.detach(), "rejected": rejected.detach()}
        logps = sequence_logprobs(model, tokens, labels)
    ref = reference[batch["index"]].to(device)
    out = dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], spec["loss"]["beta"], spec["loss"]["kind"])
    reward_margin = out["chosen_rewards"] - out["rejected_rewards"]
    logp_margin = (logps[:n] - logps[n:]).detach()
    return {"loss": out["loss"], "correct": agreement(logp_margin), "margin": logp_margin,
            "reward_correct": agreement(reward_margin), "reward_margin": reward_margin,
            "chosen": out["chosen_rewards"], "rejected": out["rejected_rewards"],
            "logp_chosen": logps[:n].detach(), "logp_rejected": logps[n:].detach()}


def agreement(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen answer wins, 0 where it loses, 1/2 on a tie (a zero-initialised head, or a
    policy still equal to its reference, ties every pair: chance, not failure)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


# Metric names: per-pair outputs averaged over every pair of the step (all ranks).
LOGGED = {"reward": {"loss": "loss", "accuracy": "correct", "margin": "margin", "chosen_reward": "chosen",
                     "rejected_reward": "rejected"},
          "dpo": {"loss": "loss", "accuracy": "correct", "logp_margin": "margin", "reward_accuracy": "reward_correct",
                  "reward_margin": "reward_margin", "chosen_reward": "chosen", "rejected_reward": "rejected",
                  "logp_chosen": "logp_chosen", "logp_rejected": "logp_rejected"}}


def sums(outputs: dict, names: dict, device) -> torch.Tensor:
    return torch.stack([outputs[key].detach().double().sum() for key in names.values()]).to(device)


def evaluate(model, spec, data: PairDataset, device, autocast_dtype, reference) -> dict:
    """Means over the held-out pairs of this rank's slice, combined over the ranks (every rank runs
    the same number of batches, since FSDP2 needs every rank in every forward)."""
    names = LOGGED[spec["objective"]]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    size = spec["train"]["batch_size"]
    per_rank = math.ceil(len(data.pairs) / data.world_size)  # the largest slice: every rank runs its batch count
    model.eval()
    with torch.no_grad():
        for i in range(min(spec["train"]["eval_batches"], math.ceil(per_rank / size))):
            indices = data.mine[i * size : (i + 1) * size]
            weight = 1.0 if indices else 0.0  # a rank past the end of its slice joins the forward, counts nothing
            batch = data.batch(indices or [0])
            outputs = pair_outputs(model, batch, spec, device, autocast_dtype, reference)
            totals += weight * torch.cat([sums(outputs, names, device),
                                          torch.tensor([float(len(batch["index"]))], dtype=torch.float64, device=device)])
    model.train()
    dist.all_reduce(totals)
    return {f"val_{name}": (totals[i] / totals[-1].clamp(min=1)).item() for i, name in enumerate(names)}


# ---- the loop ----------------------------------------------------------------------------------------

def preference_loop(spec: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train, optim_cfg, parallel = spec["train"], spec["optim"], spec["parallel"]
    torch.set_num_threads(max(1, parallel["cpus_per_worker"]))
    # The scalar head's [B, T] scores are a squeezed view; nothing here modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    set_determinism(spec, rank)
    dims = ParallelDims(world_size, dp_shard=parallel["dp_shard"], dp_replicate=parallel["dp_replicate"],
                        tp=parallel["tp"], ep=parallel["ep"])
    dims.build_mesh(device.type)

    model = build_model(spec).to(device)
    shard_model(model, dims, train, parallel["fsdp_reshard_after_forward"])
    optimizer = build_optimizer(model, optim_cfg["lr"], optim_cfg["weight_decay"], tuple(optim_cfg["betas"]),
                                optim_cfg["eps"], foreach=dims.tp == 1)
    scheduler = build_scheduler(optimizer, optim_cfg["warmup_steps"], train["steps"], optim_cfg["min_lr_ratio"])
    dp_rank, dp_size = dims.dp_rank(rank), dims.dp_size
    data = spec["data"]
    margin = spec["loss"].get("margin", 0.0)  # reward: for pairs that carry no "margin" of their own
    train_data = PairDataset(data["train"], data["tokenizer"], train["seq_len"], seed=spec["seed"], rank=dp_rank,
                             world_size=dp_size, default_margin=margin)
    val_data = PairDataset(data["validation"], data["tokenizer"], train["seq_len"], rank=dp_rank, world_size=dp_size,
                           shuffle=False, default_margin=margin, drop_remainder=False)
    reference = {"train": None, "validation": None}
    if spec["objective"] == "dpo":
        from safetensors.torch import load_file

        reference = load_file(spec["reference_logprobs"])

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer_state, rank_state = ckpt.load(folder, rank, model, optimizer)
        scheduler.load_state_dict(trainer_state["scheduler"])
        train_data.load_state_dict(rank_state["data"])
        step = trainer_state["step"]
        if rank == 0:
            print(f"[{spec['stage']}] resumed from the checkpoint at step {step}", flush=True)

    autocast_dtype = torch.bfloat16 if train["mixed_precision"] == "bf16" else None
    stage_run = spec.get("stage_run") if rank == 0 else None
    names = LOGGED[spec["objective"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # a DTensor's numel is its global size
    if stage_run is not None:
        stage_run.log_params({"trainable_params": n_trainable})
    accum, batch_size = train["grad_accum"], train["batch_size"]
    metrics: dict = {}
    initial: dict = {}
    if step == 0 and train["eval_every"]:
        initial = evaluate(model, spec, val_data, device, autocast_dtype, reference["validation"])
        if rank == 0:
            print(f"[{spec['stage']}] before training: " + " ".join(f"{k} {v:.4g}" for k, v in initial.items()), flush=True)
            if stage_run is not None:
                stage_run.log_metrics(initial, step=0)
    progress = Progress(train["steps"], spec["stage"], every=train["log_every"])
    model.train()
    while step < train["steps"]:
        start = time.perf_counter()
        batches = [train_data.next_batch(batch_size) for _ in range(accum)]
        n_pairs = batch_size * accum * dp_size
        totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last micro-batch only
                model.set_requires_gradient_sync(i == accum - 1)
            outputs = pair_outputs(model, batch, spec, device, autocast_dtype, reference["train"])
            # FSDP2 averages gradients over the dp ranks; scaled by dp_size the step's loss is the
            # mean over all its pairs.
            loss = outputs["loss"].sum() * dp_size / n_pairs
            if model.config.is_moe:
                loss = loss + model.moe_aux_loss() / accum
            loss.backward()
            totals += sums(outputs, names, device)
        max_norm = optim_cfg["grad_clip"] or math.inf
        if dims.tp > 1:
            grad_norm = clip_mixed_grad_norm_(trainable, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dist.all_reduce(totals)
        totals /= dims.tp  # tensor-parallel peers hold the same batch
        step_time = time.perf_counter() - start
        metrics = {name: (totals[i] / n_pairs).item() for i, name in enumerate(names)}
        metrics.update(grad_norm=grad_norm.item(), lr=lr, pairs_per_s=n_pairs / step_time, step_time_s=step_time,
                       memory_gb=memory_gb(device), trainable_params=n_trainable,
                       optimizer_state_mb=optimizer_state_bytes(optimizer) / 2**20)
        if train["eval_every"] and (step % train["eval_every"] == 0 or step == train["steps"]):
            metrics.update(evaluate(model, spec, val_data, device, autocast_dtype, reference["validation"]))
        if rank == 0:
            shown = {k: metrics[k] for k in ("loss", "accuracy", "margin", "logp_margin", "val_accuracy",
                                             "val_margin", "val_logp_margin") if k in metrics}
            progress.update(step, lr=lr, **shown)
            if stage_run is not None and (step % train["log_every"] == 0 or "val_accuracy" in metrics
                                          or step == train["steps"]):
                stage_run.log_metrics(metrics, step=step)
        if step == train["steps"]:
            metrics.update({f"initial_{k}": v for k, v in initial.items()})
        if step % train["checkpoint_every"] == 0 or step == train["steps"]:
            report_checkpoint(step, rank, model, optimizer, scheduler, train_data, metrics)

    export_model(spec, model, rank, dims.tp)
    ray.train.report({**metrics, "step": step, "done": 1})

