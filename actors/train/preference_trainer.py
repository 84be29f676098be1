"""The Ray Train worker loop for preference training, and the reference model's log-probs.

Two objectives on one loop (``spec.objective``; the losses are in ``raylm.train.losses``):

- ``reward``: a ``TransformerWithScalarHead`` started from a causal-LM checkpoint (fresh zero
  head) scores chosen and rejected answers; Bradley-Terry loss ``-log sigmoid(r_c - r_r - m)``.
- ``dpo``: a policy ``Transformer`` against a frozen reference whose log-probs were computed once,
  before training, by ``reference_logprobs`` (plain Ray tasks); sigmoid (DPO) or IPO loss.

The set-up is pretraining's (``actors/train/train_worker.py`` over the engine of ``raylm.train.engine``):
one process per rank, FSDP2 (and tensor parallel) applied from outside the model, AdamW with
warmup + cosine, gradient accumulation and clipping, sharded DCP checkpoints reported to Ray Train
(a replaced worker resumes from the newest one), rank 0 logging to MLflow and exporting the final
model in Hugging Face format. Held-out pairs are scored before the
first step and every ``eval_every`` steps, so a run shows where it started and where it got to.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.distributed as dist

from raylm.actors.train.train_worker import export_final_model, inject_fault, report_checkpoint, resume, start_worker
from raylm.models.hf_checkpoint import load_checkpoint
from raylm.data.preferences import PairDataset
from raylm.tracking import Progress
from raylm.train.engine import Engine, memory_gb
from raylm.train.losses import dpo_pair_outputs, reward_pair_outputs, sequence_logprobs
from raylm.train.spec import TrainingSpec


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
        from raylm.peft.quantize import quantize_model

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


# ---- one step's numbers ------------------------------------------------------------------------------

def pair_outputs(engine: Engine, batch: dict, spec: TrainingSpec, reference: torch.Tensor | None) -> dict:
    """Per-pair loss and what is logged about it, for one batch (chosen rows first, then rejected)."""
    device = engine.device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    with engine.autocast():
        if spec.objective == "reward":
            return reward_pair_outputs(engine.model, tokens, batch["attention_mask"].to(device), batch["margin"].to(device))
        logps = sequence_logprobs(engine.model, tokens, labels)
    return dpo_pair_outputs(logps, reference[batch["index"]].to(device), spec.dpo.beta, spec.dpo.kind)


# Metric names: per-pair outputs averaged over every pair of the step (all ranks).
LOGGED = {"reward": {"loss": "loss", "accuracy": "correct", "margin": "margin", "chosen_reward": "chosen",
                     "rejected_reward": "rejected"},
          "dpo": {"loss": "loss", "accuracy": "correct", "logp_margin": "margin", "reward_accuracy": "reward_correct",
                  "reward_margin": "reward_margin", "chosen_reward": "chosen", "rejected_reward": "rejected",
                  "logp_chosen": "logp_chosen", "logp_rejected": "logp_rejected"}}


def sums(outputs: dict, names: dict, device) -> torch.Tensor:
    return torch.stack([outputs[key].detach().double().sum() for key in names.values()]).to(device)


def evaluate(engine: Engine, spec: TrainingSpec, data: PairDataset, reference) -> dict:
    """Means over the held-out pairs of this rank's slice, combined over the ranks (every rank runs
    the same number of batches, since FSDP2 needs every rank in every forward)."""
    device = engine.device
    names = LOGGED[spec.objective]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    size = spec.train.batch_size
    per_rank = math.ceil(len(data.pairs) / data.world_size)  # the largest slice: every rank runs its batch count
    engine.model.eval()
    with torch.no_grad():
        for i in range(min(spec.train.eval_batches, math.ceil(per_rank / size))):
            indices = data.mine[i * size : (i + 1) * size]
            weight = 1.0 if indices else 0.0  # a rank past the end of its slice joins the forward, counts nothing
            batch = data.batch(indices or [0])
            outputs = pair_outputs(engine, batch, spec, reference)
            totals += weight * torch.cat([sums(outputs, names, device),
                                          torch.tensor([float(len(batch["index"]))], dtype=torch.float64, device=device)])
    engine.model.train()
    dist.all_reduce(totals)
    return {f"val_{name}": (totals[i] / totals[-1].clamp(min=1)).item() for i, name in enumerate(names)}


# ---- the loop ----------------------------------------------------------------------------------------

def preference_loop(config: dict) -> None:
    """One Ray Train worker of `raylm reward` / `raylm dpo`: ``config["spec"]`` is the stage's
    ``TrainingSpec`` (objective ``reward`` or ``dpo``, ``PairData``)."""
    import ray.train

    spec: TrainingSpec = config["spec"]
    # The scalar head's [B, T] scores are a squeezed view; nothing here modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rank, device, dims, engine = start_worker(spec)
    train = spec.train
    dp_rank, dp_size = dims.dp_rank(rank), dims.dp_size
    data = spec.data
    train_data = PairDataset(data.train, data.tokenizer, train.seq_len, seed=spec.seed, rank=dp_rank,
                             world_size=dp_size, default_margin=spec.reward_margin)
    val_data = PairDataset(data.validation, data.tokenizer, train.seq_len, rank=dp_rank, world_size=dp_size,
                           shuffle=False, default_margin=spec.reward_margin, drop_remainder=False)
    reference = {"train": None, "validation": None}
    if spec.objective == "dpo":
        from safetensors.torch import load_file

        reference = load_file(spec.dpo.reference_logprobs)
    step = first_step = resume(spec, engine, train_data, rank)

    stage_run = spec.stage_run if rank == 0 else None
    names = LOGGED[spec.objective]
    if stage_run is not None:
        stage_run.log_params({"trainable_params": engine.n_trainable})
    accum, batch_size = train.grad_accum, train.batch_size
    metrics: dict = {}
    initial: dict = {}
    if step == 0 and train.eval_every:
        initial = evaluate(engine, spec, val_data, reference["validation"])
        if rank == 0:
            print(f"[{spec.stage}] before training: " + " ".join(f"{k} {v:.4g}" for k, v in initial.items()), flush=True)
            if stage_run is not None:
                stage_run.log_metrics(initial, step=0)
    progress = Progress(train.steps, spec.stage, every=train.log_every)
    while step < train.steps:
        inject_fault(spec, step + 1, rank)
        start = time.perf_counter()
        batches = [train_data.next_batch(batch_size) for _ in range(accum)]
        n_pairs = batch_size * accum * dp_size
        totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            engine.sync_gradients(i == accum - 1)
            outputs = pair_outputs(engine, batch, spec, reference["train"])
            # FSDP2 averages gradients over the dp ranks; scaled by dp_size the step's loss is the
            # mean over all its pairs.
            loss = outputs["loss"].sum() * dp_size / n_pairs
            if engine.config.is_moe:
                loss = loss + engine.model.moe_aux_loss() / accum
            loss.backward()
            totals += sums(outputs, names, device)
        grad_norm, lr = engine.step()
        step += 1
        dist.all_reduce(totals)
        totals /= dims.tp  # tensor-parallel peers hold the same batch
        step_time = time.perf_counter() - start
        metrics = {name: (totals[i] / n_pairs).item() for i, name in enumerate(names)}
        metrics.update(grad_norm=grad_norm.item(), lr=lr, pairs_per_s=n_pairs / step_time, step_time_s=step_time,
                       memory_gb=memory_gb(device), trainable_params=engine.n_trainable,
                       optimizer_state_mb=engine.optimizer_state_mb())
        if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
            metrics.update(evaluate(engine, spec, val_data, reference["validation"]))
        if rank == 0:
            shown = {k: metrics[k] for k in ("loss", "accuracy", "margin", "logp_margin", "val_accuracy",
                                             "val_margin", "val_logp_margin") if k in metrics}
            progress.update(step, lr=lr, **shown)
            if stage_run is not None and (step % train.log_every == 0 or "val_accuracy" in metrics
                                          or step == train.steps):
                stage_run.log_metrics(metrics, step=step)
        if step == train.steps:  # in the last checkpoint's metrics, which the driver gets
            metrics.update({f"initial_{k}": v for k, v in initial.items()}, resumed_from_step=first_step or None)
        if step % train.checkpoint_every == 0 or step == train.steps:
            report_checkpoint(step, rank, engine, train_data, metrics)

    export_final_model(spec, engine, rank)
    ray.train.report({**metrics, "step": step, "done": 1})
