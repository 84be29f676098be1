"""Full fine-tuning against LoRA and QLoRA (LoRA on an NF4 base) of the same model, in one run:
trainable parameters, weight and optimizer-state memory, peak memory and step time; then, on a
trained checkpoint, the size and perplexity of its int8 and NF4 quantizations against full precision.

Each method trains in its own fresh process (spawned), so that peak memory is its own: on CPU the
peak resident set size during training (Linux: the counter is reset once the model is built),
shown above the process's resident size before the model was built (the Python + torch baseline);
on a GPU ``torch.cuda.max_memory_allocated``. Training is
AdamW on random tokens (memory and time do not depend on the data); the first 2 steps are not timed.

    .venv/bin/python benchmarks/peft.py                                      # CPU, preset small (~28M)
    .venv/bin/python benchmarks/peft.py --preset tiny --steps 6 \\
        --checkpoint out/laptop/pretrain/hf --tokens out/laptop/data/tokens  # + quantized perplexity
    python benchmarks/peft.py --device cuda --preset 1b --batch-size 4 --seq-len 1024 --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("full", "lora", "qlora")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Linux: restart the process's peak-RSS counter (VmHWM), so that building the model (for QLoRA:
    in fp32, then quantized) does not count towards the training peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 2**10


def train_method(method: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from raylm.train.engine import optimizer_state_bytes
    from raylm.peft.lora import apply_peft, count_parameters
    from raylm.models.config import preset
    from raylm.models.transformer import Transformer
    from raylm.train.optim import build_optimizer
    from raylm.peft.config import PeftConfig
    from raylm.peft.quantize import model_bytes

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    baseline = resident_mb()
    model = Transformer(preset(args.preset, max_seq_len=args.seq_len))
    model.init_weights(seed=0)
    model.to(device)
    if method != "full":
        apply_peft(model, PeftConfig(method="lora", rank=args.rank, alpha=2 * args.rank,
                                     quantize="nf4" if method == "qlora" else "none"))
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model, args.lr, 0.0, (0.9, 0.95), 1e-8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    import gc

    gc.collect()
    peak_reset = device.type == "cpu" and reset_peak_rss()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator).to(device)
    times, losses, grads_bytes = [], [], 0
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        grads_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[2:] or times
    out = {
        "method": method,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "weights_mb": model_bytes(model) / 2**20,
        "grads_mb": grads_bytes / 2**20,
        "optimizer_state_mb": optimizer_state_bytes(optimizer) / 2**20,
        "step_time_s": sum(timed) / len(timed),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mb() if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        out.update(peak_memory_mb=peak, peak_above_baseline_mb=peak - baseline, peak_counts_setup=not peak_reset)
    return out


def _child(method, args, queue):
    queue.put(train_method(method, args))


def quantization_report(args: argparse.Namespace) -> list[dict]:
    """Size and perplexity of a checkpoint at fp32, int8 and NF4 on held-out token shards."""
    import torch
    import torch.nn.functional as F

    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.peft.quantize import model_bytes, quantize_model
    from raylm.data.token_shards import PackedTokenDataset

    torch.set_num_threads(args.threads)
    reference = load_checkpoint(args.checkpoint)
    seq_len = min(args.seq_len, reference.config.max_seq_len)
    dataset = PackedTokenDataset(args.tokens, split="validation", seq_len=seq_len, seed=0, rank=0, world_size=1,
                                 shuffle=False, loop=False)
    batches = []
    for i, example in enumerate(dataset):
        if i == args.eval_sequences:
            break
        batches.append(example)
    rows = []
    for kind in ("fp32", "int8", "nf4"):
        model = load_checkpoint(args.checkpoint)
        if kind != "fp32":
            quantize_model(model, kind)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for example in batches:
                logits = model(example["tokens"][None])[0]
                total += F.cross_entropy(logits.float(), example["labels"], reduction="sum").item()
                count += example["labels"].numel()
        linear_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("codes", "scales")))
        if kind == "fp32":
            linear_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                               if n.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight")))
        rows.append({"weights": kind, "model_mb": model_bytes(model) / 2**20, "block_weights_mb": linear_bytes / 2**20,
                     "perplexity": math.exp(total / count), "tokens": count})
    for row in rows:
        row["perplexity_change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpoint", help="a Hugging Face folder: adds int8 / NF4 size and perplexity")
    parser.add_argument("--tokens", help="`raylm data` token shards (validation split) for the perplexity")
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    context = mp.get_context("spawn")
    results = []
    for method in args.methods:
        queue = context.Queue()
        process = context.Process(target=_child, args=(method, args, queue))
        process.start()
        results.append(queue.get())
        process.join()
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len}, LoRA rank {args.rank} on all 7 "
          f"projections, {args.device}{' bf16' if args.bf16 else ''}")
    # state: weights + gradients + optimizer state, summed over the actual tensors (exact); peak: the
    # process's peak above its pre-model baseline (CPU: RSS, which also counts activations and the
    # allocator's cached blocks; GPU: max allocated)
    header = (f"{'method':<7}{'trainable':>12}{'%':>7}{'weights MB':>12}{'grads MB':>10}{'optim MB':>10}"
              f"{'state MB':>10}{'peak MB':>10}{'step s':>8}")
    print(header)
    full = next((r for r in results if r["method"] == "full"), None)
    for r in results:
        peak = r.get("peak_above_baseline_mb", r["peak_memory_mb"])
        r["state_mb"] = r["weights_mb"] + r["grads_mb"] + r["optimizer_state_mb"]
        print(f"{r['method']:<7}{r['trainable_params']:>12,}{r['trainable_pct']:>7.2f}{r['weights_mb']:>12.1f}"
              f"{r['grads_mb']:>10.1f}{r['optimizer_state_mb']:>10.2f}{r['state_mb']:>10.1f}{peak:>10.0f}"
              f"{r['step_time_s']:>8.3f}")
        if full is not None and r is not full:
            r["optimizer_state_reduction_x"] = full["optimizer_state_mb"] / max(r["optimizer_state_mb"], 1e-9)
            print(f"        optimizer state {r['optimizer_state_reduction_x']:.0f}x lower than full fine-tuning")
    report = {"args": vars(args), "training": results}
    if args.checkpoint:
        if not args.tokens:
            parser.error("--checkpoint needs --tokens (validation shards for the perplexity)")
        report["quantization"] = quantization_report(args)
        print(f"\n{args.checkpoint}: {args.eval_sequences} validation sequences of {args.seq_len} tokens")
        print(f"{'weights':<8}{'model MB':>10}{'blocks MB':>11}{'perplexity':>12}{'change':>9}")
        for row in report["quantization"]:
            print(f"{row['weights']:<8}{row['model_mb']:>10.2f}{row['block_weights_mb']:>11.2f}"
                  f"{row['perplexity']:>12.3f}{row['perplexity_change_pct']:>+8.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
