"""SFT -> GRPO on the built-in arithmetic family (raylm.tasks.arithmetic), from several seeds: does
RL with the family's own rule (numeric match of the final answer) raise held-out accuracy over the
SFT model, and how does asynchronous RL (rollout.max_staleness: 1, truncated IS) compare with
synchronous RL in wall time to the same training accuracy?

    .venv/bin/python benchmarks/rl_grpo.py --seeds 3 --sft-steps 3000 --grpo-steps 30 --prompts-per-step 16 --lr 1e-4 --n-eval 200 --no-split-digits

(the figures of 2026-12-07 are in benchmarks/README.md)

1. The task files (raylm.tasks.files.write_task_files): SFT conversations and RL prompt records, train
   and held-out problems disjoint.
2. A few-million-parameter model fine-tuned from scratch on the SFT split for --sft-steps steps
   (plain PyTorch, answers only in the loss), saved as a Hugging Face checkpoint: the SFT model.
3. For each seed, `raylm rlhf`'s training (pipelines/rlhf.train) from the SFT model: GRPO, the rule
   as the only reward (reward.rule: per_item), on one set of Ray actor pools (vLLM engine), first
   synchronous, then asynchronous. Each run evaluates the same held-out prompts with the same sampling
   seeds before and after, so each prompt's accuracy gain is paired.

Prints, per seed and run, held-out accuracy before -> after with the paired gain and its 95%
interval; the mean gain over seeds with its interval; and, sync vs async, the wall time of the
step loop until the training accuracy (3-step running mean) first reaches the same target (the
lower of the two runs' best), with the ratio. Equal work: both runs do the same steps with the same
prompts per step and samples per prompt (printed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sft_model(work: Path, args) -> Path:
    from raylm.data.chat_template import ChatTemplate
    from raylm.data.sft import labels_of, read_conversations
    from raylm.data.tokenizer import PAD_ID, train_tokenizer
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer, causal_lm_loss
    from raylm.train.losses import IGNORE_INDEX

    conversations = read_conversations(str(work / "tasks" / "sft" / "arithmetic_train.jsonl"))
    tokenizer_file = work / "tokenizer.json"
    train_tokenizer((m["content"] for c in conversations for m in c), args.vocab, tokenizer_file,
                    split_digits=not args.no_split_digits)
    template = ChatTemplate(tokenizer_file)
    examples = []
    for conversation in conversations:
        ids, target = template.encode(conversation)
        examples.append((ids, labels_of(ids, target)))
    longest = max(len(ids) for ids, _ in examples)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=template.tokenizer.get_vocab_size(),
                               max_seq_len=max(longest, args.max_prompt_tokens) + args.max_new_tokens + 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng, started = random.Random(0), time.perf_counter()
    for step in range(args.sft_steps):
        batch = rng.sample(examples, 32)
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), PAD_ID)
        y = torch.full((len(batch), width), IGNORE_INDEX)
        for i, (ids, labels) in enumerate(batch):
            x[i, :len(ids)], y[i, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        for group in optimizer.param_groups:
            group["lr"] = args.sft_lr * min(1.0, (step + 1) / 50)
        loss = causal_lm_loss(model, x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"sft step {step + 1}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return save_checkpoint(model.eval(), work / "sft", tokenizer_file=tokenizer_file)


def rl_config(work: Path, sft: Path, args, seed: int, staleness: int):
    from raylm.pipelines import rlhf

    name = f"seed{seed}-{'async' if staleness else 'sync'}"
    return rlhf.Config.model_validate({
        "output_dir": str(work / name), "seed": seed, "ray": {"num_cpus": 6},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
        "policy": {"checkpoint": str(sft), "num_workers": 1, "lr": args.lr},
        "reward": {"checkpoint": None, "rule": "per_item", "normalize": False},
        "rollout": {"backend": "vllm", "max_new_tokens": args.max_new_tokens, "gpu_memory_utilization": 0.05,
                    "temperature": 1.0, "max_staleness": staleness},
        "data": {"builtin": None, "prompts": str(work / "tasks" / "rl" / "arithmetic_train.jsonl"),
                 "held_out": str(work / "tasks" / "rl" / "arithmetic_heldout.jsonl"),
                 "max_prompt_tokens": args.max_prompt_tokens},
        "ppo": {"steps": args.grpo_steps, "prompts_per_step": args.prompts_per_step, "samples_per_prompt": 4,
                "advantage": "grpo", "epochs": 1, "minibatches": 1, "loss_aggregation": "token_mean",
                "tis_cap": 2.0 if staleness else None},
        "kl": {"coef": 0.0},
        "eval": {"prompts": args.n_eval, "samples_per_prompt": 2},
        "checkpoint": {"every": 0, "resume": False},
    })


def interval(values: list[float]) -> tuple[float, float, float]:
    m = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, m - half, m + half


def time_to(step_s: list[float], accuracy: list[float], target: float) -> float | None:
    """Wall time of the step loop until the 3-step running mean of the training accuracy reaches ``target``."""
    for i in range(len(accuracy)):
        window = accuracy[max(0, i - 2):i + 1]
        if np.mean(window) >= target - 1e-9:
            return float(sum(step_s[:i + 1]))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--grpo-steps", type=int, default=10)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=64, help="held-out prompts evaluated before and after")
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--no-split-digits", action="store_true",
                    help="let BPE merge digits (by default every digit is its own token, as in Llama)")
    ap.add_argument("--no-async", action="store_true", help="only the synchronous runs")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import ray

    from raylm.pipelines import rlhf
    from raylm.tasks.files import write_task_files
    from raylm.tracking import start_run

    work = Path(tempfile.mkdtemp(prefix="raylm-rl-grpo-"))
    write_task_files("arithmetic", work / "tasks", args.n_train, max(args.n_eval, 1), seed=0, parts=("sft", "rl"))
    started = time.perf_counter()
    sft = sft_model(work, args)
    print(f"SFT model in {time.perf_counter() - started:.0f} s: {sft}", flush=True)

    first = rl_config(work, sft, args, 0, 0)
    rlhf.check(first, "benchmark")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    task = rlhf.Task(first)
    pools = rlhf.Pools.start(first)
    rows = []
    try:
        for seed in range(args.seeds):
            for staleness in ([0] if args.no_async else [0, 1]):
                config = rl_config(work, sft, args, seed, staleness)
                run = start_run(config.tracking.uri, "raylm-rl-grpo", config.output_path.name, config.output_dir)
                summary = rlhf.train(config, run, pools, task)
                before, after = summary["before_held_out"], summary["after_held_out"]
                row = {"seed": seed, "staleness": staleness, "before": before["rule"], "after": after["rule"],
                       "gain": summary["held_out_rule_gain"], "step_s": summary["step_s"],
                       "train_accuracy": [m["reward/rule_mean"] for m in summary["history"]]}
                rows.append(row)
                g = row["gain"]
                print(json.dumps({k: row[k] for k in ("seed", "staleness", "before", "after")}) +
                      f"  gain {g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]", flush=True)
    finally:
        pools.shutdown()
        ray.shutdown()

    print(f"\n{args.seeds} seeds x {args.grpo_steps} GRPO steps x {args.prompts_per_step} prompts x 4 samples; "
          f"{args.n_eval} held-out prompts x 2 samples, before and after (same seeds)")
    sync = [r for r in rows if r["staleness"] == 0]
    gains = [r["gain"]["mean"] for r in sync]
    print("sync: held-out accuracy " + ", ".join(f"{r['before']:.3f} -> {r['after']:.3f}" for r in sync))
    m, lo, hi = interval(gains)
    print(f"sync: gain over SFT per seed {['%+.3f' % g for g in gains]}; mean {m:+.3f} (95% interval over seeds "
          f"{lo:+.3f} to {hi:+.3f})")
    print(f"sync: seeds with a positive gain: {sum(g > 0 for g in gains)} of {len(gains)}")
    if not args.no_async:
        asyn = [r for r in rows if r["staleness"] == 1]
        ratios = []
        for s, a in zip(sync, asyn):
            target = min(max(np.convolve(r["train_accuracy"], np.ones(3) / 3, mode="valid"), default=0)
                         for r in (s, a))
            ts, ta = time_to(s["step_s"], s["train_accuracy"], target), time_to(a["step_s"], a["train_accuracy"], target)
            loop_s, loop_a = sum(s["step_s"]), sum(a["step_s"])
            print(f"seed {s['seed']}: step loop sync {loop_s:.0f} s, async {loop_a:.0f} s (ratio {loop_s / loop_a:.2f}); "
                  f"to training accuracy {target:.3f}: sync {ts if ts is None else round(ts)} s, async "
                  f"{ta if ta is None else round(ta)} s; held-out after: sync {s['after']:.3f}, async {a['after']:.3f}")
            if ts and ta:
                ratios.append(ts / ta)
        if ratios:
            print(f"sync / async wall time to the same training accuracy: {np.mean(ratios):.2f} "
                  f"(per seed {['%.2f' % r for r in ratios]})")


if __name__ == "__main__":
    main()
