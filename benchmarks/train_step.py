"""Throughput of raylm's real training step (FSDP2 + AdamW + clipping, inside Ray Train workers):
tokens/s and MFU for 1 and 2 workers (scaling), on random-token shards written to a temp folder.

MFU is FLOPs per token (models.transformer.flops_per_token, PaLM convention) x tokens/s per worker,
over the device's peak: the data-sheet bf16 figure for known GPUs, else a large matmul measured once
per device type (cached in ~/.cache/raylm/peak_flops.json). The first 2 steps are not timed.

    .venv/bin/python benchmarks/train_step.py                                   # CPU, debug model, 1 and 2 workers
    .venv/bin/python benchmarks/train_step.py --preset tiny --workers 1 2 --steps 20
    python benchmarks/train_step.py --gpu --preset 1b --workers 1 --batch-size 4 --seq-len 2048 \
        --bf16 --ac selective --compile                                           # one GPU, ~1B dense
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_shards(folder: Path, vocab_size: int, n_tokens: int) -> Path:
    from raylm.data.token_shards import TokenShardWriter, write_index

    rng = np.random.default_rng(0)
    splits = {}
    for split, size in (("train", n_tokens), ("validation", n_tokens // 20)):
        writer = TokenShardWriter(folder, split, vocab_size, eos_token_id=2)
        for start in range(0, size, 4096):  # 4K-token "documents"
            writer.add(rng.integers(3, vocab_size, 4096))
        splits[split] = writer.close()
    write_index(folder, vocab_size, 2, splits)
    return folder


def run_one(args, workers: int, data_dir: Path, out: Path) -> dict:
    from raylm.config import load_config
    from raylm.pipelines import pretrain
    from raylm.ray_init import init_ray
    from raylm.train.launcher import launch, training_spec
    from raylm.train.spec import TokenData

    overrides = [
        f"output_dir={out}", f"data_dir={data_dir}", f"model.preset={args.preset}",
        f"model.max_seq_len={max(args.seq_len, 64)}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "train.eval_every=0",
        f"train.checkpoint_every={args.steps}", f"train.log_every={max(1, args.steps // 5)}",
        f"train.mixed_precision={'bf16' if args.bf16 else 'fp32'}", f"train.activation_checkpointing={args.ac}",
        f"train.compile={str(args.compile).lower()}", "train.resume=false",
        f"parallel.num_workers={workers}", f"parallel.cpus_per_worker={args.cpus_per_worker}",
        f"parallel.use_gpu={str(args.gpu).lower()}",
    ] + ([f"ray.num_cpus={args.num_cpus}"] if args.num_cpus else [])
    config = load_config(pretrain.Config, None, overrides)
    init_ray(config.ray)
    spec = training_spec(config, "pretrain", None, model=config.model.to_dict(), data=TokenData(str(data_dir)))
    final = launch(config, spec)
    return {"workers": workers, "tokens_per_s": final["mean_tokens_per_s"], "mfu": final["mean_mfu"],
            "peak_flops_per_device": final["peak_flops_per_device"], "memory_gb": final["memory_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--ac", choices=["off", "selective", "full"], default="off")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    args = parser.parse_args()

    import ray

    from raylm.models.config import preset

    vocab = preset(args.preset).vocab_size
    results = []
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        tokens = max(args.steps * max(args.workers) * args.batch_size * (args.seq_len + 1) * 2, 1 << 20)
        data_dir = random_shards(Path(tmp) / "data", vocab, tokens)
        for workers in args.workers:
            results.append(run_one(args, workers, data_dir, Path(tmp) / f"run{workers}"))
    ray.shutdown()
    base = results[0]["tokens_per_s"] / results[0]["workers"]
    print(f"\npreset {args.preset}, {args.batch_size} x {args.seq_len} tokens per worker per step, "
          f"{'bf16' if args.bf16 else 'fp32'}, AC {args.ac}, compile {args.compile}")
    print(f"{'workers':>8} {'tokens/s':>12} {'MFU':>8} {'scaling eff.':>13} {'peak mem GB':>12}")
    for r in results:
        efficiency = r["tokens_per_s"] / (base * r["workers"])
        print(f"{r['workers']:>8} {r['tokens_per_s']:>12,.0f} {r['mfu']:>8.2%} {efficiency:>13.2%} {r['memory_gb']:>12.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
