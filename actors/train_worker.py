"""The Ray Train worker loop that pretraining and SFT share: one process per rank, FSDP2 over gloo
(CPU) or NCCL (GPU), AdamW with warmup + cosine, gradient accumulation and clipping, bf16
autocast over fp32 master weights, sharded checkpoints reported to Ray Train, and a final
Hugging Face export from rank 0.

The driver (``pipelines/pretrain.py``, ``pipelines/sft.py``) passes one plain dict, ``spec``:
model config, where the weights start from, which data, the ``train``/``optim``/``parallel``
sections, the MLflow ``stage_run`` and the export folder.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylm.distributed import checkpoint as ckpt
from raylm.distributed.context_parallel import shard_sequence
from raylm.distributed.expert_parallel import scale_expert_grads
from raylm.distributed.parallel_dims import ParallelDims
from raylm.distributed.parallelize import clean_state_dict_key, parallelize
from raylm.distributed.pipeline_parallel import (attach_aux_loss, build_schedule, gather_stage_states, run_pipeline,
                                                 split_stage)
from raylm.distributed.pipeline_parallel import clip_grad_norm_ as clip_pipeline_grad_norm_
from raylm.distributed.tensor_parallel import clip_grad_norm_ as clip_mixed_grad_norm_
from raylm.distributed.tensor_parallel import unpermute_state_dict
from raylm.models.config import TransformerConfig
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import Transformer, document_causal_mask, document_positions, flops_per_token
from raylm.optim import build_optimizer, build_scheduler
from raylm.tracking import Progress

IGNORE_INDEX = -100
# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s); other devices are measured.
DATASHEET_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


# ---- the model -------------------------------------------------------------------------------

def build_model(spec: dict) -> Transformer:
    """The same full weights on every rank (seeded init, or the starting checkpoint); sharding comes after."""
    if spec.get("init_checkpoint"):
        model = load_checkpoint(spec["init_checkpoint"])
    else:
        model = Transformer(TransformerConfig(**spec["model"]))
        model.init_weights(seed=spec["seed"])
    freeze_by_depth(model, spec.get("train_layers"), spec.get("train_layers_from", "last"))
    if (spec.get("peft") or {}).get("method", "none") != "none":  # LoRA / QLoRA: raylm.lora, from outside
        from raylm.lora import apply_peft
        from raylm.peft_config import PeftConfig

        apply_peft(model, PeftConfig(**spec["peft"]), seed=spec["seed"])
    return model


def freeze_by_depth(model: Transformer, train_layers: int | None, where: str = "last") -> None:
    """Train only ``train_layers`` blocks plus the final norm and output head (0: the head on frozen
    features): the last ones (``where="last"``), the first (``"early"``) or the middle ones
    (``"intermediate"``). With tied embeddings the head is the embedding matrix, so it trains too."""
    if train_layers is None:
        return
    n_layers = len(model.layers)
    if not 0 <= train_layers <= n_layers:
        raise ValueError(f"train_layers: {train_layers} is not between 0 and the model's {n_layers} layers")
    start = {"last": n_layers - train_layers, "early": 0, "intermediate": (n_layers - train_layers) // 2}[where]
    model.requires_grad_(False)
    for name in list(model.layers)[start:start + train_layers]:
        model.layers[name].requires_grad_(True)
    model.norm.requires_grad_(True)
    if model.output is not None:
        model.output.requires_grad_(True)


# ---- data ------------------------------------------------------------------------------------

def build_dataset(spec: dict, split: str, rank: int, world_size: int, training: bool):
    data, train = spec["data"], spec["train"]
    if data["kind"] == "tokens":
        from raylm.token_shards import PackedTokenDataset

        return PackedTokenDataset(data["dir"], split=split, seq_len=train["seq_len"], seed=spec["seed"], rank=rank,
                                  world_size=world_size, shuffle=training, loop=training)
    if data["kind"] == "sft":
        from raylm.sft_data import PackedSFTDataset

        return PackedSFTDataset(data[split], data["tokenizer"], seq_len=train["seq_len"], seed=spec["seed"],
                                rank=rank, world_size=world_size, shuffle=training, loop=training,
                                system_prompt=data.get("system_prompt"))
    raise ValueError(f"unknown data kind {data['kind']!r}")


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


def summed_cross_entropy(model, tokens, labels, positions, attn_mask, autocast_dtype, device_type):
    """Sum (not mean) of the token losses, so that micro-batches and ranks with different numbers of
    unmasked tokens combine into the exact mean over the whole step."""
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens, positions, attn_mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


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


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


# ---- the loop --------------------------------------------------------------------------------

def inject_fault(spec: dict, step: int, rank: int) -> None:
    """Fault injection for tests and drills: rank ``fail_rank`` SIGKILLs its own process when it is
    about to run step ``fail_at_step``, once per run (a marker file beside the checkpoints says it
    already happened, so the replacement worker goes on)."""
    train = spec["train"]
    if train.get("fail_at_step") != step or rank != train.get("fail_rank", 1):
        return
    marker = Path(spec["run_dir"]) / f"fault_injected_at_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at step {step}\n")
    print(f"[fault injection] rank {rank}: SIGKILL at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def set_determinism(spec: dict, rank: int) -> None:
    torch.manual_seed(spec["seed"] + rank)
    if spec["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def evaluate(model, spec, dims, rank, device, autocast_dtype, pipeline=None, loss_scale=None) -> float:
    """Mean token loss over the first ``eval_batches`` batches of every rank's validation slice."""
    dataset = build_dataset(spec, "validation", rank, dims.dp_size, training=False)
    # Pipeline stages exchange activations of one fixed micro-batch shape: no short last batch.
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["train"]["batch_size"], drop_last=pipeline is not None)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == spec["train"]["eval_batches"]:
                break
            tokens, labels, positions, attn_mask = model_inputs(batch, device, dims.cp, dims.cp_rank(dist.get_rank()))
            n_labels = (labels != IGNORE_INDEX).sum().double()
            if pipeline is not None:  # only the last stage has losses: it alone counts the tokens
                loss_scale["value"] = 1.0
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    losses = run_pipeline(pipeline, tokens, labels, dims.pp_rank(dist.get_rank()), dims.pp, train=False,
                                          positions=positions, attn_mask=attn_mask)
                if not losses:
                    continue
                loss = sum(losses)
            else:
                loss = summed_cross_entropy(model, tokens, labels, positions, attn_mask, autocast_dtype, device.type)
            totals += torch.stack([loss.double(), n_labels])
    model.train()
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


def train_loop(spec: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train, optim_cfg, parallel = spec["train"], spec["optim"], spec["parallel"]
    torch.set_num_threads(max(1, parallel["cpus_per_worker"]))
    set_determinism(spec, rank)
    dims = ParallelDims(world_size, dp_shard=parallel["dp_shard"], dp_replicate=parallel["dp_replicate"],
                        tp=parallel["tp"], ep=parallel["ep"], cp=parallel.get("cp", 1), pp=parallel.get("pp", 1))
    dims.build_mesh(device.type)
    pp_rank = dims.pp_rank(rank)

    model = build_model(spec).to(device)
    cfg = model.config
    if dims.pp > 1:  # this rank's blocks of the whole (identically initialised) model
        split_stage(model, dims.pp, pp_rank)
    parallelize(model, dims, train["activation_checkpointing"], train["compile"],
                reshard_after_forward=parallel["fsdp_reshard_after_forward"])
    pipeline = loss_scale = None
    if dims.pp > 1:
        loss_scale = {"value": 1.0}  # set per step: the schedule calls the loss once per micro-batch

        def pipeline_loss(logits, labels):
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") * loss_scale["value"]

        pipeline = build_schedule(model, pp_rank, dims.pp, dims.pp_mesh.get_group(), device,
                                  parallel["pp_microbatches"], pipeline_loss,
                                  microbatch=(train["batch_size"] // parallel["pp_microbatches"],
                                              train["seq_len"] // dims.cp),
                                  dim=cfg.dim, vocab_size=cfg.vocab_size, kind=parallel["pp_schedule"])
        if cfg.is_moe:  # each micro-batch's auxiliary loss, averaged over the step's micro-batches
            attach_aux_loss(model, {"value": 1.0 / (train["grad_accum"] * parallel["pp_microbatches"])})
    optimizer = build_optimizer(model, optim_cfg["lr"], optim_cfg["weight_decay"], tuple(optim_cfg["betas"]),
                                optim_cfg["eps"], foreach=dims.tp == dims.ep == 1)  # foreach cannot mix DTensors and tensors
    scheduler = build_scheduler(optimizer, optim_cfg["warmup_steps"], train["steps"], optim_cfg["min_lr_ratio"])
    dataset = build_dataset(spec, "train", dims.dp_rank(rank), dims.dp_size, training=True)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer_state, rank_state = ckpt.load(folder, rank, model, optimizer)
        scheduler.load_state_dict(trainer_state["scheduler"])
        dataset.load_state_dict(rank_state["data"])
        step = trainer_state["step"]
        if rank == 0:
            print(f"[{spec['stage']}] resumed from the checkpoint at step {step}", flush=True)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=train["batch_size"]))

    autocast_dtype = torch.bfloat16 if train["mixed_precision"] == "bf16" else None
    flops_token = flops_per_token(cfg, train["seq_len"])
    peak = peak_flops(device, autocast_dtype or torch.float32)
    stage_run = spec.get("stage_run") if rank == 0 else None
    progress = Progress(train["steps"], spec["stage"], every=train["log_every"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # a DTensor's numel is its global size
    if stage_run is not None:
        stage_run.log_params({"trainable_params": n_trainable})
    accum = train["grad_accum"]
    moe_tally = None
    if cfg.is_moe:  # every training forward's expert loads and auxiliary losses, summed over the step
        moe_tally = torch.zeros(cfg.n_layers, cfg.n_experts + len(MOE_COLUMNS), dtype=torch.float64, device=device)
        model.register_forward_hook(lambda module, args, output: tally_moe(module, moe_tally) if module.training else None)
    model.train()
    metrics: dict = {}
    timed_tokens, timed_seconds, first_step = 0, 0.0, step  # throughput after 2 warm-up steps
    while step < train["steps"]:
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
            if pipeline is not None:  # the schedule runs forward and backward over its micro-batches
                loss_scale["value"] = dims.grad_average_size / n_tokens.clamp(min=1).item()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    losses = run_pipeline(pipeline, tokens, labels, pp_rank, dims.pp, positions=positions,
                                          attn_mask=attn_mask)
                loss_sum += sum(loss.detach().double() for loss in losses) / loss_scale["value"] if losses else 0.0
                continue
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last micro-batch only
                model.set_requires_gradient_sync(i == accum - 1)
            ce = summed_cross_entropy(model, tokens, labels, positions, attn_mask, autocast_dtype, device.type)
            # FSDP2 averages gradients over the dp (and cp) ranks; scaling by their number turns that
            # into the global mean.
            loss = ce * dims.grad_average_size / n_tokens.clamp(min=1)
            if cfg.is_moe:
                loss = loss + model.moe_aux_loss() / accum
            loss.backward()
            loss_sum += ce.detach().double()
        if dims.ep > 1:
            scale_expert_grads([p for m in model.moe_layers() for p in (m.experts.w13, m.experts.w2)], dims.dp_size,
                               dims.cp_mesh.get_group() if dims.cp > 1 else None, dims.cp)
        max_norm = optim_cfg["grad_clip"] or math.inf
        if dims.pp > 1:
            grad_norm = clip_pipeline_grad_norm_(trainable, max_norm, dims.pp_mesh.get_group())
        elif dims.tp > 1 or dims.ep > 1:
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
            "mfu": flops_token * tokens_per_s / world_size / peak,
            "memory_gb": memory_gb(device),
            "step_time_s": step_time,
            "trainable_params": n_trainable,
            "optimizer_state_mb": optimizer_state_bytes(optimizer) / 2**20,
        }
        if moe_tally is not None:
            metrics.update(moe_metrics(moe_tally))
        if train["eval_every"] and (step % train["eval_every"] == 0 or step == train["steps"]):
            metrics["val_loss"] = evaluate(model, spec, dims, dims.dp_rank(rank), device, autocast_dtype,
                                           pipeline, loss_scale)
        if rank == 0:
            progress.update(step, tokens=step_tokens, loss=metrics["loss"], gnorm=metrics["grad_norm"], lr=lr,
                            mfu=metrics["mfu"], **({"val": metrics["val_loss"]} if "val_loss" in metrics else {}))
            if stage_run is not None and (step % train["log_every"] == 0 or "val_loss" in metrics
                                          or step == train["steps"]):
                stage_run.log_metrics(metrics, step=step)
        if step == train["steps"] and timed_seconds:  # in the last checkpoint's metrics, which the driver gets
            metrics["mean_tokens_per_s"] = timed_tokens / timed_seconds
            metrics["mean_mfu"] = flops_token * metrics["mean_tokens_per_s"] / world_size / peak
            metrics["peak_flops_per_device"] = peak
        if step % train["checkpoint_every"] == 0 or step == train["steps"]:
            report_checkpoint(step, rank, model, optimizer, scheduler, dataset, metrics)

    export_final_model(spec, model, rank, dims.tp, dims)
    ray.train.report({**metrics, "step": step, "done": 1})


def optimizer_state_bytes(optimizer) -> int:
    """The optimizer's state tensors (AdamW: two moments per trainable weight, plus step counts);
    sharded ones (DTensors) count at their global size."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def report_checkpoint(step, rank, model, optimizer, scheduler, dataset, metrics) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as folder:
        ckpt.save(folder, rank, model, optimizer, {"step": step, "scheduler": scheduler.state_dict()},
                  {"data": dataset.state_dict()})
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def export_final_model(spec: dict, model, rank: int, tp: int = 1, dims: ParallelDims | None = None) -> None:
    """Gather the full weights (collective) and write them from rank 0 as a Hugging Face checkpoint."""
    if dims is not None and dims.pp > 1:  # every stage's full weights, merged on rank 0
        state = gather_stage_states(ckpt.full_model_state_dict(model, on_every_rank=True),
                                    rank % dims.stage_size == 0, rank)
    else:
        state = ckpt.full_model_state_dict(model)
    if rank != 0:
        return
    state = {clean_state_dict_key(k): v for k, v in state.items()}
    if (spec.get("peft") or {}).get("method", "none") != "none":
        # The trained weights in hf/adapter (LoRA, soft prompt: PEFT's format), then the merged model
        # in hf/ where the method merges (LoRA); bottleneck adapters and soft prompts stay adapters.
        from raylm.lora import export_peft
        from raylm.peft_config import PeftConfig

        folder = Path(spec["export_dir"]) / "adapter"
        state = export_peft(state, model.config, PeftConfig(**spec["peft"]), folder, base=spec.get("init_checkpoint"))
        if state is None:
            print(f"[{spec['stage']}] wrote the {spec['peft']['method']} weights to {folder} (they do not merge into "
                  f"the base: raylm.lora.load_peft(load_checkpoint(base), folder) applies them)", flush=True)
            return
    if tp > 1:
        state = unpermute_state_dict(state, model.config, tp)
    plain = Transformer(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "output.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"final export: missing {missing}, unexpected {unexpected}")
    save_checkpoint(plain, spec["export_dir"], tokenizer_file=spec.get("tokenizer_file"))
    print(f"[{spec['stage']}] wrote the final model to {spec['export_dir']}", flush=True)
