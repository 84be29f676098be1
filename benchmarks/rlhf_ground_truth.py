"""Does PPO improve the ground truth, not only the reward model's score? `raylm rlhf` against the SFT
policy it starts from, over several seeds, on the built-in task with a known ground truth (the
right docstring line for a standard-library function; word-overlap F1 with it).

    .venv/bin/python benchmarks/rlhf_ground_truth.py                 # 5 seeds, 30 PPO steps each
    .venv/bin/python benchmarks/rlhf_ground_truth.py --seeds 3 --steps 60 --advantage rloo

The models are the RLHF tests' (tests/rlhf_fixtures.py): a briefly fine-tuned debug-size policy
and a reward model regressed onto the ground truth of that policy's own samples. One set of Ray
pools (2 FSDP2 policy ranks, a critic, one vLLM engine, reward and reference actors) runs every
seed; each run starts from the same SFT checkpoint. Before and after each run the policy samples
the same fixed prompts with the same sampling seeds (``eval`` in pipelines/rlhf.py), so each
seed's gain is a paired difference; the script prints every run and the mean gain with a 95%
t-interval across seeds, for the training prompts and the held-out ones.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # two-sided 95%, by df


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:+.3f}"
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.3f} (95% CI {mean - half:+.3f} .. {mean + half:+.3f}, {sum(v > 0 for v in values)}/{len(values)} > 0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--advantage", default="gae", choices=["gae", "grpo", "rloo"])
    parser.add_argument("--limit", type=int, default=20, help="functions of the built-in task")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per eval prompt")
    parser.add_argument("--models", type=Path, default=None, help="reuse fixture models built here")
    args = parser.parse_args()

    import ray

    from raylm.pipelines import rlhf
    from raylm.tracking import start_run
    from rlhf_fixtures import MAX_PROMPT_TOKENS, build_all

    work = Path(tempfile.mkdtemp(prefix="raylm-gt-"))
    models = args.models or work / "models"
    started = time.perf_counter()
    if (models / "sft" / "config.json").exists():
        built = {"sft": models / "sft", "reward": models / "reward"}
    else:
        built = build_all(models, limit=args.limit)
        print(f"fixture models in {models} ({time.perf_counter() - started:.0f} s); reward model: "
              f"{json.dumps(built['reward_stats'])}", flush=True)
    samples = args.eval_samples if args.advantage == "gae" else max(2, args.eval_samples)

    def config_for(seed: int) -> rlhf.Config:
        out = work / f"seed{seed}"
        return rlhf.Config.model_validate({
            "output_dir": str(out), "seed": seed, "ray": {"num_cpus": 6},
            "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
            "policy": {"checkpoint": str(built["sft"]), "num_workers": 2, "lr": args.lr},
            "critic": {"num_workers": 1}, "reward": {"checkpoint": str(built["reward"])},
            "rollout": {"backend": "vllm", "max_new_tokens": 32, "gpu_memory_utilization": 0.05},
            "data": {"builtin": "stdlib", "limit": args.limit, "max_prompt_tokens": MAX_PROMPT_TOKENS},
            "ppo": {"steps": args.steps, "prompts_per_step": 32, "epochs": 2, "minibatches": 2,
                    "advantage": args.advantage, "samples_per_prompt": 1 if args.advantage == "gae" else 4},
            "kl": {"estimator": "k1", "mode": "reward", "coef": args.kl_coef},
            "eval": {"prompts": 32, "samples_per_prompt": samples},
            "checkpoint": {"every": 0, "resume": False},
        })

    first = config_for(0)
    rlhf.check(first, "benchmark")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    task = rlhf.Task(first)  # one task (one train / held-out split) for every seed
    pools = rlhf.Pools.start(first)
    rows = []
    try:
        for seed in range(args.seeds):
            config = config_for(seed)
            t = time.perf_counter()
            summary = rlhf.train(config, start_run(config.tracking.uri, "raylm-gt", f"seed{seed}", config.output_dir),
                                 pools, task)
            row = {"seed": seed, "seconds": time.perf_counter() - t}
            for split, key in (("train", ""), ("held_out", "_held_out")):
                before, after = summary[f"before{key}"], summary[f"after{key}"]
                for metric in ("reward", "ground_truth", "kl"):
                    row[f"{split}/{metric}"] = (before.get(metric), after.get(metric))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        pools.shutdown()
        ray.shutdown()

    print(f"\n{args.seeds} seeds x {args.steps} PPO steps ({args.advantage}), {len(task.train)} training prompts, "
          f"{len(task.held_out)} held out, {samples} samples per prompt; total {time.perf_counter() - started:.0f} s")
    print("| seed | reward (train) | ground truth (train) | KL | ground truth (held out) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        (rb, ra), (gb, ga), (_, kl), (hb, ha) = (r["train/reward"], r["train/ground_truth"], r["train/kl"],
                                                 r["held_out/ground_truth"])
        held = f"{hb:.3f} -> {ha:.3f}" if hb is not None else "n/a"
        print(f"| {r['seed']} | {rb:.3f} -> {ra:.3f} | {gb:.3f} -> {ga:.3f} | {kl:.2f} | {held} |")
    for split in ("train", "held_out"):
        gains = [r[f"{split}/ground_truth"][1] - r[f"{split}/ground_truth"][0] for r in rows
                 if r[f"{split}/ground_truth"][0] is not None]
        if gains:
            print(f"ground-truth gain ({split}): {interval(gains)}")
    print(f"reward-model score gain (train): {interval([r['train/reward'][1] - r['train/reward'][0] for r in rows])}")


if __name__ == "__main__":
    main()
