"""The one Ray Train worker loop of every training stage (`raylm pretrain`, `sft`, `reward`, `dpo`):
one process per rank, running the training engine (``raylm.train.engine``: FSDP2 over gloo on CPU or
NCCL on GPU, tensor / context / expert / pipeline parallel, AdamW with warmup + cosine, clipping,
bf16 autocast over fp32 master weights, DCP checkpoints, Hugging Face export) on the stage's
objective (``raylm.train.objectives``: next-token cross-entropy, Bradley-Terry, DPO / IPO).

``train_loop`` runs the same way for every objective, top to bottom: start (``start_worker``),
resume from the newest checkpoint (``resume``), then each step's micro-batches (gradient
accumulation), the clipped step, held-out evaluation, logging to the console and MLflow, checkpoints
reported to Ray Train (a replaced worker resumes from the newest one) and the final export. The
driver passes one typed ``raylm.train.spec.TrainingSpec`` as ``config["spec"]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from raylm.distributed import checkpoint as ckpt
from raylm.distributed.parallel_dims import ParallelDims
from raylm.tracking import Progress
from raylm.train.engine import Engine, build_model, memory_gb
from raylm.train.objectives import build_objective
from raylm.train.spec import TrainingSpec


# ---- what every Ray Train worker does ------------------------------------------------------------

def inject_fault(spec: TrainingSpec, step: int, rank: int) -> None:
    """Fault injection for tests and drills: rank ``fail_rank`` SIGKILLs its own process when it is
    about to run step ``fail_at_step``, once per run (a marker file beside the checkpoints says it
    already happened, so the replacement worker goes on)."""
    if spec.train.fail_at_step != step or rank != spec.train.fail_rank:
        return
    marker = Path(spec.run_dir) / f"fault_injected_at_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at step {step}\n")
    print(f"[fault injection] rank {rank}: SIGKILL at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def set_determinism(spec: TrainingSpec, rank: int) -> None:
    torch.manual_seed(spec.seed + rank)
    if spec.train.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def start_worker(spec: TrainingSpec) -> tuple[int, torch.device, ParallelDims, Engine]:
    """This rank's place in the group, its device mesh, and the engine holding its shard of the
    model. -> (rank, device, dims, engine)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    parallel, train = spec.parallel, spec.train
    torch.set_num_threads(max(1, parallel.cpus_per_worker))
    set_determinism(spec, rank)
    dims = ParallelDims(world_size, dp_shard=parallel.dp_shard, dp_replicate=parallel.dp_replicate,
                        tp=parallel.tp, ep=parallel.ep, cp=parallel.cp, pp=parallel.pp)
    dims.build_mesh(device.type)
    model = build_model(config=spec.model, checkpoint=spec.init_checkpoint, scalar_head=spec.objective == "reward",
                        seed=spec.seed, train_layers=spec.freeze.train_layers, train_from=spec.freeze.train_from,
                        peft=spec.peft, implementation=spec.implementation)
    engine = Engine(model, dims, device, spec.optim, train.steps, mixed_precision=train.mixed_precision,
                    activation_checkpointing=train.activation_checkpointing, compile=train.compile,
                    reshard_after_forward=parallel.fsdp_reshard_after_forward, grad_accum=train.grad_accum,
                    pp_schedule=parallel.pp_schedule, pp_microbatches=parallel.pp_microbatches,
                    batch_shape=(train.batch_size, train.seq_len), peft=spec.peft,
                    base_checkpoint=spec.init_checkpoint)
    return rank, device, dims, engine


def newest_checkpoint(spec: TrainingSpec, world_size: int):
    """The checkpoint to resume from: the newest one Ray Train holds. That is the one it hands
    this (replaced) worker group, unless a newer complete one is in the run's storage folder: Ray
    Train registers a report only when its controller next polls every rank, so a worker that dies
    soon after reporting takes the registration of its last checkpoint with it. -> a context
    manager yielding a local folder, or None for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    newest = newest_checkpoint_folder(spec.run_dir, world_size)
    if checkpoint is not None and (newest is None or checkpoint_step(Path(checkpoint.path)) >= checkpoint_step(newest)):
        return checkpoint.as_directory()
    if newest is not None:
        return contextlib.nullcontext(str(newest))
    return None


def checkpoint_step(folder: Path) -> int:
    """The step in a ``checkpoint_<step>`` folder's name (-1 for another name)."""
    try:
        return int(folder.name.removeprefix("checkpoint_"))
    except ValueError:
        return -1


def newest_checkpoint_folder(run_dir: str | None, world_size: int) -> Path | None:
    """The newest ``checkpoint_<step>`` folder of ``run_dir`` that every one of ``world_size`` ranks
    finished writing (its DCP shard and state file; rank 0's trainer state and the DCP metadata)."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    for folder in sorted(Path(run_dir).glob("checkpoint_*"), key=checkpoint_step, reverse=True):
        needed = [ckpt.TRAINER_STATE, ".metadata"] + [name for rank in range(world_size)
                                                       for name in (ckpt.rank_state_file(rank), f"__{rank}_0.distcp")]
        if checkpoint_step(folder) >= 0 and all((folder / name).is_file() for name in needed):
            return folder
    return None


def resume(spec: TrainingSpec, engine: Engine, rank: int) -> tuple[int, dict | None]:
    """Load the newest checkpoint into the engine (and this rank's RNG states), and say so. -> the
    step to go on from (0: a fresh start) and this rank's data position (None: from the start)."""
    found = newest_checkpoint(spec, dist.get_world_size())
    if found is None:
        return 0, None
    with found as folder:
        trainer_state, rank_state = engine.load(folder, rank)
    step = trainer_state["step"]
    if rank == 0:
        print(f"[{spec.stage}] resumed from step {step} (checkpoint {folder})", flush=True)
    return step, rank_state["data"]


def report_checkpoint(step: int, rank: int, engine: Engine, dataset, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as folder:
        engine.save(folder, rank, {"step": step}, {"data": dataset.state_dict()})
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def export_final_model(spec: TrainingSpec, engine: Engine, rank: int) -> None:
    """Collective: the final weights, written from rank 0 in Hugging Face (and PEFT) format."""
    written = engine.export(spec.export_dir, spec.tokenizer_file)
    if rank != 0:
        return
    if spec.peft is not None and written.name == "adapter":
        print(f"[{spec.stage}] wrote the {spec.peft.method} weights to {written} (they do not merge into the base: "
              f"raylm.peft.lora.load_peft(load_checkpoint(base), folder) applies them)", flush=True)
    else:
        print(f"[{spec.stage}] wrote the final model to {written}", flush=True)


# ---- the loop ----------------------------------------------------------------------------------------

def train_loop(config: dict) -> None:
    """One Ray Train worker of a training stage: ``config["spec"]`` is the stage's ``TrainingSpec``;
    its ``objective`` (lm, reward, dpo) picks what the loop optimises."""
    import ray.train

    spec: TrainingSpec = config["spec"]
    rank, device, dims, engine = start_worker(spec)
    train = spec.train
    step, data_state = resume(spec, engine, rank)
    first_step = step
    objective = build_objective(spec, engine, rank)
    if data_state is not None:
        objective.train_data.load_state_dict(data_state)

    stage_run = spec.stage_run if rank == 0 else None
    if stage_run is not None:
        stage_run.log_params({"trainable_params": engine.n_trainable})
    initial: dict = {}
    if step == 0 and train.eval_every and objective.evaluates_first:
        initial = objective.evaluate()
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in initial.items())
            print(f"[{spec.stage}] before training: {shown}", flush=True)
            if stage_run is not None:
                stage_run.log_metrics(initial, step=0)
    progress = Progress(train.steps, spec.stage, every=train.log_every)
    accum = train.grad_accum
    metrics: dict = {}
    while step < train.steps:
        inject_fault(spec, step + 1, rank)
        start = time.perf_counter()
        batches = objective.batches(accum)
        count = objective.count(batches)  # the step's loss is the mean over these, every rank's together
        sums = torch.zeros(len(objective.logged), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            if engine.pipeline is not None:  # the schedule runs forward and backward over its micro-batches
                sums += objective.pipeline(batch, scale=dims.grad_average_size / float(count))
                continue
            engine.sync_gradients(i == accum - 1)
            loss_sum, logged = objective.loss(batch)
            # FSDP2 averages gradients over the dp (and cp) ranks; scaling by their number turns that
            # into the global mean.
            loss = loss_sum * dims.grad_average_size / count
            if engine.is_moe:
                loss = loss + engine.model.moe_aux_loss() / accum
            loss.backward()
            sums += logged
        grad_norm, lr = engine.step()
        step += 1
        dist.all_reduce(sums)
        sums /= dims.tp  # tensor-parallel peers hold the same batch
        step_time = time.perf_counter() - start
        metrics = {name: (sums[i] / count).item() for i, name in enumerate(objective.logged)}
        metrics.update(grad_norm=grad_norm.item(), lr=lr,
                       **objective.step_metrics(batches, step_time, timed=step > first_step + 2),
                       step_time_s=step_time, memory_gb=memory_gb(device), trainable_params=engine.n_trainable,
                       optimizer_state_mb=engine.optimizer_state_mb())
        evaluated = train.eval_every and (step % train.eval_every == 0 or step == train.steps)
        if evaluated:
            metrics.update(objective.evaluate())
        if rank == 0:
            progress.update(step, **objective.console(metrics))
            if stage_run is not None and (step % train.log_every == 0 or evaluated or step == train.steps):
                stage_run.log_metrics(metrics, step=step)
        if step == train.steps:  # in the last checkpoint's metrics, which the driver gets
            metrics.update({f"initial_{k}": v for k, v in initial.items()}, resumed_from_step=first_step or None,
                           **objective.final_metrics())
        if step % train.checkpoint_every == 0 or step == train.steps:
            report_checkpoint(step, rank, engine, objective.train_data, metrics)

    export_final_model(spec, engine, rank)
    ray.train.report({**metrics, "step": step, "done": 1})
