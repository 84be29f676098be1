"""The Ray Train worker of the training stages: one process per rank, running the training engine
(``raylm.train.engine``: FSDP2 over gloo on CPU or NCCL on GPU, AdamW with warmup + cosine,
clipping, bf16 autocast over fp32 master weights, DCP checkpoints, Hugging Face export).

``train_loop`` is pretraining's and SFT's (next-token cross-entropy over packed sequences);
``actors/train/preference_trainer.py`` holds the reward model's and DPO's, over pairs. What every
worker does around its loop is here: start (``start_worker``), resume from the newest checkpoint
(``resume``), report checkpoints to Ray Train and export the final model. The driver passes one
typed ``raylm.train.spec.TrainingSpec`` as ``config["spec"]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from raylm.distributed import checkpoint as ckpt
from raylm.distributed.context_parallel import shard_sequence
from raylm.distributed.parallel_dims import ParallelDims
from raylm.models.transformer import document_causal_mask, document_positions, flops_per_token
from raylm.tracking import Progress
from raylm.train.engine import Engine, build_model, memory_gb
from raylm.train.losses import IGNORE_INDEX
from raylm.train.spec import ConversationData, TokenData, TrainingSpec

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s); other devices are measured.
DATASHEET_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


# ---- data ------------------------------------------------------------------------------------

def build_dataset(spec: TrainingSpec, split: str, rank: int, world_size: int, training: bool):
    data, train = spec.data, spec.train
    if isinstance(data, TokenData):
        from raylm.data.token_shards import PackedTokenDataset

        return PackedTokenDataset(data.dir, split=split, seq_len=train.seq_len, seed=spec.seed, rank=rank,
                                  world_size=world_size, shuffle=training, loop=training)
    if isinstance(data, ConversationData):
        from raylm.data.sft import PackedSFTDataset

        return PackedSFTDataset(getattr(data, split), data.tokenizer, seq_len=train.seq_len, seed=spec.seed,
                                rank=rank, world_size=world_size, shuffle=training, loop=training,
                                system_prompt=data.system_prompt)
    raise ValueError(f"{spec.stage}: the language-model loop reads token shards or conversations, not {type(data).__name__}")


def model_inputs(batch: dict, device, cp: int = 1, cp_rank: int = 0) -> tuple:
    """(tokens, labels, positions, attn_mask) of a batch, or of this rank's chunk of every sequence
    under context parallelism."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    doc = batch["document_ids"].to(device) if "document_ids" in batch else None
    if cp > 1:
        return shard_sequence(tokens, labels, doc, cp_rank, cp)
    positions = attn_mask = None
    if doc is not None:  # packed examples: no attention across examples, positions restart
        positions, attn_mask = document_positions(doc), document_causal_mask(doc)
    return tokens, labels, positions, attn_mask


# ---- throughput ------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device for MFU: the data sheet's for known GPUs, else measured once per
    device type with a large matmul and cached in ~/.cache/raylm/peak_flops.json."""
    name = device_name(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        for key, value in DATASHEET_PEAK_BF16.items():
            if key in name:
                return value
    cache = Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm")) / "peak_flops.json"
    key = f"{name} {dtype}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_matmul_flops(device, dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    return known[key]


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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
                        peft=spec.peft)
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


def resume(spec: TrainingSpec, engine: Engine, dataset, rank: int) -> int:
    """Load the newest checkpoint into the engine and the data position, and say so. -> the step
    to go on from (0: a fresh start)."""
    found = newest_checkpoint(spec, dist.get_world_size())
    if found is None:
        return 0
    with found as folder:
        trainer_state, rank_state = engine.load(folder, rank)
        dataset.load_state_dict(rank_state["data"])
    step = trainer_state["step"]
    if rank == 0:
        print(f"[{spec.stage}] resumed from step {step} (checkpoint {folder})", flush=True)
    return step


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


# ---- language modelling: pretraining and SFT ------------------------------------------------------

def evaluate(engine: Engine, spec: TrainingSpec, dp_rank: int) -> float:
    """Mean token loss over the first ``eval_batches`` batches of every rank's validation slice."""
    dims, device = engine.dims, engine.device
    dataset = build_dataset(spec, "validation", dp_rank, dims.dp_size, training=False)
    # Pipeline stages exchange activations of one fixed micro-batch shape: no short last batch.
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec.train.batch_size, drop_last=engine.pipeline is not None)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    engine.model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == spec.train.eval_batches:
                break
            tokens, labels, positions, attn_mask = model_inputs(batch, device, dims.cp, dims.cp_rank(dist.get_rank()))
            n_labels = (labels != IGNORE_INDEX).sum().double()
            if engine.pipeline is not None:  # only the last stage has losses: it alone counts the tokens
                losses = engine.pipeline_lm(tokens, labels, positions, attn_mask, scale=1.0, train=False)
                if not losses:
                    continue
                loss = sum(losses)
            else:
                loss = engine.lm_loss_sum(tokens, labels, positions, attn_mask)
            totals += torch.stack([loss.double(), n_labels])
    engine.model.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


MOE_COLUMNS = ("aux_loss", "load_balance_loss", "z_loss", "forwards")  # after the per-expert token counts


def tally_moe(model, tally: torch.Tensor) -> None:
    """Add the last forward's MoE statistics to ``tally`` [n_layers, n_experts + 4], a row per block
    by its index in the whole model (a pipeline stage holds only some blocks)."""
    n_experts = tally.shape[1] - len(MOE_COLUMNS)
    for name, block in model.layers.items():  # (blocks may be wrapped for checkpointing or compile)
        moe = next((m for m in block.modules() if hasattr(m, "tokens_per_expert")), None)
        if moe is not None:
            row = tally[int(name)]
            row[:n_experts] += moe.tokens_per_expert.to(row)
            # detached tensors, not float(): no host-device sync per layer and micro-batch
            losses = (moe.aux_loss, moe.load_balance_loss, moe.z_loss, torch.ones(()))
            row[n_experts:] += torch.stack([torch.as_tensor(v).detach().to(row) for v in losses])


def moe_metrics(tally: torch.Tensor) -> dict:
    """From every rank's summed tally: each loss's mean per forward (aux summed over layers, the
    others averaged), and each layer's share of tokens per expert."""
    n_experts = tally.shape[1] - len(MOE_COLUMNS)
    rows = [(i, row) for i, row in enumerate(tally) if row[-1] > 0]
    if not rows:
        return {}
    per_forward = {i: row[n_experts:-1] / row[-1] for i, row in rows}
    out = {"moe/aux_loss": sum(float(v[0]) for v in per_forward.values()),
           "moe/load_balance_loss": sum(float(v[1]) for v in per_forward.values()) / len(rows),
           "moe/z_loss": sum(float(v[2]) for v in per_forward.values()) / len(rows)}
    for i, row in rows:
        counts = row[:n_experts]
        for e, fraction in enumerate((counts / counts.sum().clamp(min=1)).tolist()):
            out[f"moe/layer{i}/expert{e}_fraction"] = fraction
    return out


def train_loop(config: dict) -> None:
    """One Ray Train worker of `raylm pretrain` / `raylm sft`: ``config["spec"]`` is the stage's
    ``TrainingSpec``."""
    import ray.train

    spec: TrainingSpec = config["spec"]
    rank, device, dims, engine = start_worker(spec)
    train = spec.train
    model, cfg = engine.model, engine.config
    dataset = build_dataset(spec, "train", dims.dp_rank(rank), dims.dp_size, training=True)
    step = resume(spec, engine, dataset, rank)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=train.batch_size))

    flops_token = flops_per_token(cfg, train.seq_len)
    peak = peak_flops(device, engine.autocast_dtype or torch.float32)
    stage_run = spec.stage_run if rank == 0 else None
    progress = Progress(train.steps, spec.stage, every=train.log_every)
    if stage_run is not None:
        stage_run.log_params({"trainable_params": engine.n_trainable})
    accum = train.grad_accum
    moe_tally = None
    if cfg.is_moe:  # every training forward's expert loads and auxiliary losses, summed over the step
        moe_tally = torch.zeros(cfg.n_layers, cfg.n_experts + len(MOE_COLUMNS), dtype=torch.float64, device=device)
        model.register_forward_hook(lambda module, args, output: tally_moe(module, moe_tally) if module.training else None)
    metrics: dict = {}
    timed_tokens, timed_seconds, first_step = 0, 0.0, step  # throughput after 2 warm-up steps
    while step < train.steps:
        inject_fault(spec, step + 1, rank)
        start = time.perf_counter()
        batches = [next(loader) for _ in range(accum)]
        # The step's loss is the mean over every unmasked token of every rank's micro-batches.
        n_tokens = torch.tensor(float(sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)), device=device)
        dist.all_reduce(n_tokens)
        n_tokens /= dims.tp * dims.cp * dims.pp  # tensor-, context- and pipeline-parallel peers hold the same batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        if moe_tally is not None:
            moe_tally.zero_()
        for i, batch in enumerate(batches):
            tokens, labels, positions, attn_mask = model_inputs(batch, device, dims.cp, dims.cp_rank(rank))
            if engine.pipeline is not None:  # the schedule runs forward and backward over its micro-batches
                scale = dims.grad_average_size / n_tokens.clamp(min=1).item()
                losses = engine.pipeline_lm(tokens, labels, positions, attn_mask, scale=scale)
                loss_sum += sum(loss.detach().double() for loss in losses) / scale if losses else 0.0
                continue
            engine.sync_gradients(i == accum - 1)
            ce = engine.lm_loss_sum(tokens, labels, positions, attn_mask)
            # FSDP2 averages gradients over the dp (and cp) ranks; scaling by their number turns that
            # into the global mean.
            loss = ce * dims.grad_average_size / n_tokens.clamp(min=1)
            if cfg.is_moe:
                loss = loss + model.moe_aux_loss() / accum
            loss.backward()
            loss_sum += ce.detach().double()
        grad_norm, lr = engine.step()
        step += 1
        dist.all_reduce(loss_sum)
        loss_sum /= dims.tp
        if moe_tally is not None:
            dist.all_reduce(moe_tally)
        step_time = time.perf_counter() - start
        step_tokens = sum(b["tokens"].numel() for b in batches) * dims.dp_size
        tokens_per_s = step_tokens / step_time
        if step > first_step + 2:
            timed_tokens, timed_seconds = timed_tokens + step_tokens, timed_seconds + step_time
        metrics = {
            "loss": (loss_sum / n_tokens.clamp(min=1)).item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "mfu": flops_token * tokens_per_s / dims.world_size / peak,
            "memory_gb": memory_gb(device),
            "step_time_s": step_time,
            "trainable_params": engine.n_trainable,
            "optimizer_state_mb": engine.optimizer_state_mb(),
        }
        if moe_tally is not None:
            metrics.update(moe_metrics(moe_tally))
        if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
            metrics["val_loss"] = evaluate(engine, spec, dims.dp_rank(rank))
        if rank == 0:
            progress.update(step, tokens=step_tokens, loss=metrics["loss"], gnorm=metrics["grad_norm"], lr=lr,
                            mfu=metrics["mfu"], **({"val": metrics["val_loss"]} if "val_loss" in metrics else {}))
            if stage_run is not None and (step % train.log_every == 0 or "val_loss" in metrics or step == train.steps):
                stage_run.log_metrics(metrics, step=step)
        if step == train.steps:  # in the last checkpoint's metrics, which the driver gets
            metrics["resumed_from_step"] = first_step or None
        if step == train.steps and timed_seconds:
            metrics["mean_tokens_per_s"] = timed_tokens / timed_seconds
            metrics["mean_mfu"] = flops_token * metrics["mean_tokens_per_s"] / dims.world_size / peak
            metrics["peak_flops_per_device"] = peak
        if step % train.checkpoint_every == 0 or step == train.steps:
            report_checkpoint(step, rank, engine, dataset, metrics)

    export_final_model(spec, engine, rank)
    ray.train.report({**metrics, "step": step, "done": 1})
