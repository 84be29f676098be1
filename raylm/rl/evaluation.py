"""RLHF's evaluation: policy samples on fixed prompts with fixed seeds (so before and after training
are paired), scored by the reward model, the verifiable rule (``reward.rule``) and the ground truth,
with the KL to the reference. The rule's score comes with a 95% interval over prompts (each prompt's
samples averaged first: they are not independent), and the gain after training with a paired one."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from raylm.eval.metrics import mean, stderr
from raylm.rl.batching import make_batch, pad_rows
from raylm.rl.config import Config
from raylm.rl.pools import Pools
from raylm.rl.prompts import Task, rollout_seeds
from raylm.rl.rollouts import collect_rollouts
from raylm.tracking import StageRun


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and its normal-approximation interval (t-free: tens of prompts or more)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    m, se = mean(values), stderr(values)
    half = z * se if not math.isnan(se) else float("nan")
    return {"mean": m, "low": m - half, "high": m + half, "n": len(values)}


def per_prompt(scores: list[float], samples: int) -> list[float]:
    return [float(np.mean(scores[i:i + samples])) for i in range(0, len(scores), samples)]


def paired_gain(before: dict, after: dict) -> dict | None:
    """After minus before on the same prompts and sampling seeds, with its 95% interval."""
    if not before.get("rule_per_prompt") or not after.get("rule_per_prompt"):
        return None
    return interval([a - b for a, b in zip(after["rule_per_prompt"], before["rule_per_prompt"])])


def evaluate(config: Config, pools: Pools, task: Task, items: list[dict], samples: int, temperature: float,
             seed: int) -> dict:
    """Policy samples on fixed prompts (with fixed seeds, so before and after are paired): mean
    score, reward-model score and rule score (with its interval), ground-truth score, KL to the
    reference (k1 summed over each response, from the engines' log-probs), response length."""
    if not items:
        return {}
    prompts = [item["ids"] for item in items for _ in range(samples)]
    owners = [item for item in items for _ in range(samples)]
    seeds = rollout_seeds(seed, 0, len(prompts))
    got = collect_rollouts(config, pools, task, owners, prompts,
                           pools.submit_rollouts(prompts, task.stop_ids, temperature, seeds), seeds, temperature)
    responses, scores = got.responses, got.scores
    batch = make_batch(prompts, responses, got.masks)
    ref = pools.reference_logprobs(batch, temperature)
    policy_lp = pad_rows(got.engine_logprobs, batch["response_mask"].shape[1])
    kl = ((policy_lp - ref) * batch["response_mask"]).sum(-1)
    truth = [task.ground_truth(o, r) for o, r in zip(owners, responses)]
    truth = [t for t in truth if t is not None]
    shown = scores.total.tolist()
    result = {"reward": scores.total.mean().item(), "ground_truth": float(np.mean(truth)) if truth else None,
              "kl": kl.mean().item(), "response_len": float(np.mean([len(r) for r in responses])),
              "samples": [{"prompt": o["prompt"], "response": task.text(r), "reference": o.get("reference"),
                           "reward": s} for o, r, s in zip(owners[::samples], responses[::samples], shown[::samples])]}
    if scores.model is not None and scores.rule is not None:
        result["reward_model"] = scores.model.mean().item()
    if scores.rule is not None:
        result["rule_per_prompt"] = per_prompt(scores.rule.tolist(), samples)
        ci = interval(result["rule_per_prompt"])
        result.update({"rule": ci["mean"], "rule_low": ci["low"], "rule_high": ci["high"],
                       "rule_failures": scores.rule_failed})
    return result


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def strip_samples(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("samples", "rule_per_prompt")}


def log_eval(stage_run: StageRun, when: str, train_eval: dict, held_out: dict, step: int) -> None:
    metrics = {}
    for prefix, result in (("eval", train_eval), ("eval_held_out", held_out)):
        for key in ("reward", "ground_truth", "kl", "response_len", "reward_model", "rule", "rule_low", "rule_high"):
            if result.get(key) is not None:
                metrics[f"{prefix}/{key}_{when}"] = result[key]
    stage_run.log_metrics(metrics, step=step)


def samples_text(before: dict, after: dict) -> str:
    lines = []
    for b, a in zip(before["samples"], after["samples"]):
        lines += [f"prompt:    {b['prompt']}", f"reference: {b['reference']}",
                  f"before:    {b['response']}  (reward {b['reward']:.3f})",
                  f"after:     {a['response']}  (reward {a['reward']:.3f})", ""]
    return "\n".join(lines)
