"""What each lifecycle stage gained over the one before it, on held-out items, with a 95% interval.

`raylm run` compares every stage with what it started from, on items no stage trained on:

- pretrain vs a unigram model: cross-entropy (nats/token) on the data stage's validation split, the
  unigram counted on its train split; a paired bootstrap over the validation's fixed-length windows.
- sft vs pretrain, rlhf vs sft (and dpo vs sft): accuracy on the headline eval task (held-out
  problems). The two models answer the same items, so the interval is a paired bootstrap over the
  items (each item's two outcomes resampled together); where the results lack the per-item outcomes
  (``exact_match_per_item``), Newcombe's interval of a difference of two independent proportions,
  which is wider (conservative).
- reward vs chance: held-out pairwise accuracy of the trained reward model against its accuracy
  before training (0.5: a fresh scalar head scores every answer alike), Wilson's interval on the
  trained accuracy, and the issue's bar (>= 0.85).
- dpo vs sft: held-out preference accuracy (log p(chosen) > log p(rejected)) after DPO against the
  SFT model's on the same pairs: a paired bootstrap over the pairs from the DPO stage's
  held_out_preferences.jsonl, else Newcombe's interval.

A gain is *shown* when its whole interval lies above zero; each line says so, or says why a stage
has no measurement.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
REWARD_BAR = 0.85  # issue #20: the reward model's held-out pairwise accuracy


@dataclass
class Gain:
    """One stage against the one before it. ``before``/``after`` are the metric's values; ``delta``
    is the improvement (``after - before``, or ``before - after`` for a loss) and ``low``/``high``
    bound it at 95%."""

    stage: str
    versus: str
    metric: str
    before: float
    after: float
    low: float
    high: float
    n: int
    method: str
    note: str = ""
    higher_is_better: bool = True

    @property
    def delta(self) -> float:
        return self.after - self.before if self.higher_is_better else self.before - self.after

    @property
    def shown(self) -> bool:
        return self.low > 0

    def line(self) -> str:
        verdict = "gain shown" if self.shown else "no gain shown (the interval reaches 0)"
        text = (f"{self.stage} vs {self.versus}: {self.metric} {self.before:.3f} -> {self.after:.3f}: "
                f"{self.delta:+.3f} [{self.low:+.3f}, {self.high:+.3f}] (n={self.n}, {self.method}); {verdict}")
        return text + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "versus": self.versus, "metric": self.metric, "before": self.before,
                "after": self.after, "higher_is_better": self.higher_is_better, "delta": self.delta, "low": self.low, "high": self.high, "n": self.n,
                "method": self.method, "shown": self.shown, "note": self.note}


@dataclass
class NotShown:
    """A stage the report cannot measure, and why."""

    stage: str
    reason: str

    def line(self) -> str:
        return f"{self.stage}: not measured: {self.reason}"

    def as_dict(self) -> dict:
        return {"stage": self.stage, "shown": False, "reason": self.reason}


# ---- intervals ------------------------------------------------------------------------------------
def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``successes / n``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(p_after: float, n_after: int, p_before: float, n_before: int,
                        confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) of ``p_after - p_before``, two proportions of
    independent samples, from each one's Wilson interval."""
    l1, u1 = wilson_interval(p_after * n_after, n_after, confidence)
    l0, u0 = wilson_interval(p_before * n_before, n_before, confidence)
    d = p_after - p_before
    low = d - math.sqrt((p_after - l1) ** 2 + (u0 - p_before) ** 2)
    high = d + math.sqrt((u1 - p_after) ** 2 + (p_before - l0) ** 2)
    return max(-1.0, low), min(1.0, high)


def paired_bootstrap(after: list[float], before: list[float], confidence: float = CONFIDENCE,
                     resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``after[i] - before[i]`` and its percentile bootstrap interval, items resampled with
    replacement (both values of an item together)."""
    if len(after) != len(before):
        raise ValueError(f"paired values: {len(after)} after, {len(before)} before")
    if not after:
        raise ValueError("paired values: none")
    diffs = [a - b for a, b in zip(after, before)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[min(resamples - 1, int(math.floor(tail * resamples)))]
    high = means[min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)]
    return sum(diffs) / n, low, high


# ---- the stages' gains ----------------------------------------------------------------------------
def accuracy_gain(stage: str, versus: str, metric: str, after: float, before: float, n: int,
                  note: str = "") -> Gain:
    low, high = newcombe_difference(after, n, before, n)
    return Gain(stage, versus, metric, before, after, low, high, n, "Newcombe", note)


def paired_accuracy_gain(stage: str, versus: str, metric: str, after: list[float], before: list[float],
                         note: str = "") -> Gain:
    """Two models' 0/1 outcomes on the same items, in the same order: the paired bootstrap's interval."""
    _, low, high = paired_bootstrap(after, before)
    return Gain(stage, versus, metric, sum(before) / len(before), sum(after) / len(after), low, high, len(after),
                "paired bootstrap over items", note)


def reward_gain(initial_accuracy: float, accuracy: float, n: int, bar: float = REWARD_BAR) -> Gain:
    """The trained reward model's held-out pairwise accuracy against its accuracy before training;
    the interval is Wilson's on the trained accuracy, shifted by the (fixed) starting point."""
    low, high = wilson_interval(accuracy * n, n)
    met = "met" if accuracy >= bar else "not met"
    return Gain("reward", "untrained head", "held-out pairwise accuracy", initial_accuracy, accuracy,
                low - initial_accuracy, high - initial_accuracy, n, "Wilson",
                f"accuracy {accuracy:.3f} [{low:.3f}, {high:.3f}], bar >= {bar}: {met}")


def window_losses(tokens, logp_of_next, window: int) -> list[float]:
    """Mean loss (nats/token) of each full ``window``-token slice of ``tokens``: ``logp_of_next(slice)``
    returns the log-probabilities of ``slice[1:]`` given what comes before each."""
    losses = []
    for start in range(0, len(tokens) - window + 1, window):
        logps = logp_of_next(tokens[start : start + window])
        losses.append(-float(sum(logps)) / len(logps))
    return losses


def pretrain_gain(data_dir: str, checkpoint: str, window: int = 256, max_windows: int = 400) -> Gain:
    """The pretrained model against a unigram model (add-one smoothed counts of the train split) on
    the validation split's ``window``-token slices: both score the same tokens (each slice's 2nd to
    last, the model with the slice before them as context), paired bootstrap over slices."""
    import numpy as np
    import torch
    import transformers

    from raylm.data.token_shards import TokenStream

    from pathlib import Path

    shards = Path(data_dir)
    if not (shards / "index.json").exists() and (shards / "tokens" / "index.json").exists():
        shards = shards / "tokens"  # `raylm data`'s output folder: the shards are in tokens/
    train, validation = TokenStream(shards, "train"), TokenStream(shards, "validation")
    counts = np.ones(train.vocab_size, dtype=np.float64)
    counts += np.bincount(train.read(0, train.num_tokens), minlength=train.vocab_size)[: train.vocab_size]
    unigram_logp = np.log(counts / counts.sum())
    tokens = validation.read(0, min(validation.num_tokens, window * max_windows))
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    window = min(window, model.config.max_position_embeddings)

    @torch.no_grad()
    def model_logp(ids):
        x = torch.tensor(ids, dtype=torch.long)[None]
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
        return logp.gather(1, x[0, 1:, None])[:, 0].tolist()

    model_loss = window_losses(tokens, model_logp, window)
    unigram_loss = window_losses(tokens, lambda ids: unigram_logp[ids[1:]].tolist(), window)
    if not model_loss:
        raise ValueError(f"{data_dir}: the validation split has fewer than {window} tokens")
    _, low, high = paired_bootstrap(unigram_loss, model_loss)  # the loss the model saves per window
    return Gain("pretrain", "unigram", "held-out loss (nats/token)", sum(unigram_loss) / len(unigram_loss),
                sum(model_loss) / len(model_loss), low, high, len(model_loss),
                f"paired bootstrap over {window}-token windows", f"{len(model_loss) * window} tokens",
                higher_is_better=False)


def headline_task(results: dict, metric: str = "exact_match") -> str | None:
    """The first eval task (in the eval's order) that reports ``metric`` for every checkpoint."""
    names = list(results)
    if not names:
        return None
    for task in results[names[0]]:
        if all(metric in results[n].get(task, {}) for n in names):
            return task
    return None


def task_gains(results: dict, metric: str = "exact_match") -> list[Gain | NotShown]:
    """SFT vs pretrain, RLHF vs SFT and DPO vs SFT on the headline task of eval's ``results``
    (checkpoint -> task -> metrics, with ``n_items``)."""
    task = headline_task(results, metric)
    if task is None:
        return [NotShown("eval", f"no eval task reports {metric} for every checkpoint")]
    gains: list[Gain | NotShown] = []
    for stage, versus in (("sft", "pretrain"), ("rlhf", "sft"), ("dpo", "sft")):
        if stage in results and versus in results:
            after, before = results[stage][task], results[versus][task]
            name = f"{task} {metric} (held-out)"
            items_after, items_before = after.get(f"{metric}_per_item"), before.get(f"{metric}_per_item")
            if items_after and items_before and len(items_after) == len(items_before):
                gains.append(paired_accuracy_gain(stage, versus, name, items_after, items_before))
                continue
            n = int(min(after["n_items"], before["n_items"]))
            gains.append(accuracy_gain(stage, versus, name, after[metric], before[metric], n))
    return gains


def preference_gain(initial_accuracy: float, accuracy: float, n: int, per_pair_file: str | None = None) -> Gain:
    """DPO's held-out preference accuracy against the starting model's: paired over the pairs when the
    stage wrote each pair's outcomes (``held_out_preferences.jsonl``), else Newcombe's interval."""
    import json
    from pathlib import Path

    metric = "held-out preference accuracy"
    if per_pair_file and Path(per_pair_file).exists():
        rows = [json.loads(line) for line in Path(per_pair_file).read_text().splitlines() if line.strip()]
        if rows:
            return paired_accuracy_gain("dpo", "sft", metric, [float(r["after_prefers_chosen"]) for r in rows],
                                        [float(r["before_prefers_chosen"]) for r in rows])
    return accuracy_gain("dpo", "sft", metric, accuracy, initial_accuracy, n)


def rule_gain(before: dict, after: dict, gain: dict) -> Gain:
    """`raylm rlhf`'s own held-out measurement: the rule's mean score before and after, and its paired
    gain (same prompts and seeds) with its interval (``held_out_rule_gain``)."""
    return Gain("rlhf", "sft", "held-out rule reward (rlhf's sampled eval)", float(before["rule"]),
                float(after["rule"]), float(gain["low"]), float(gain["high"]), int(gain["n"]),
                "paired, raylm rlhf")


def stage_gains(stages: dict, eval_results: dict | None = None, data_dir: str | None = None,
                pair_counts: dict[str, int] | None = None) -> list[Gain | NotShown]:
    """Every stage of a lifecycle run that can be measured, in the lifecycle's order. ``stages`` are the
    stages' summaries (`raylm run`'s), ``eval_results`` the eval stage's checkpoint -> task -> metrics,
    ``data_dir`` the data stage's output (pretrain's held-out windows), ``pair_counts`` the held-out
    pairs the reward and DPO stages scored."""
    pair_counts = pair_counts or {}
    by_task = {g.stage: g for g in task_gains(eval_results or {}) if isinstance(g, Gain)}
    gains: list[Gain | NotShown] = []
    if "pretrain" in stages:
        checkpoint = stages["pretrain"].get("checkpoint")
        if data_dir is None or checkpoint is None:
            gains.append(NotShown("pretrain", "no data stage output or checkpoint to score"))
        else:
            try:
                gains.append(pretrain_gain(data_dir, checkpoint))
            except (OSError, ValueError) as e:
                gains.append(NotShown("pretrain", f"{type(e).__name__}: {e}"))
    if "sft" in stages:
        gains.append(by_task.get("sft") or NotShown("sft", "the eval stage has no generate_until task scored on "
                                                         "both pretrain and sft"))
    if "reward" in stages:
        r = stages["reward"]
        if r.get("val_accuracy") is None or not pair_counts.get("reward"):
            gains.append(NotShown("reward", "no held-out pairwise accuracy (train.eval_every: 0?)"))
        else:
            gains.append(reward_gain(r.get("initial_val_accuracy") or 0.5, r["val_accuracy"], pair_counts["reward"]))
    if "rlhf" in stages:
        r = stages["rlhf"]
        if isinstance(r.get("held_out_rule_gain"), dict) and r.get("before_held_out", {}).get("rule") is not None:
            gains.append(rule_gain(r["before_held_out"], r["after_held_out"], r["held_out_rule_gain"]))
        gains.append(by_task.get("rlhf") or NotShown("rlhf", "the eval stage has no generate_until task scored on "
                                                           "both sft and rlhf"))
    if "dpo" in stages:
        r = stages["dpo"]
        if r.get("val_accuracy") is None or r.get("initial_val_accuracy") is None or not pair_counts.get("dpo"):
            gains.append(NotShown("dpo", "no held-out preference accuracy (train.eval_every: 0?)"))
        else:
            gains.append(preference_gain(r["initial_val_accuracy"], r["val_accuracy"], pair_counts["dpo"],
                                         r.get("held_out_preferences")))
        if "dpo" in by_task:
            gains.append(by_task["dpo"])
    return gains


def from_dict(d: dict) -> Gain | NotShown:
    """A gain (or a stage not measured) back from its ``as_dict()``, e.g. read from gains.json."""
    if "reason" in d:
        return NotShown(d["stage"], d["reason"])
    return Gain(**{k: d[k] for k in ("stage", "versus", "metric", "before", "after", "low", "high", "n", "method",
                                     "note", "higher_is_better")})


def markdown_gains(gains: list[Gain | NotShown]) -> str:
    """The gains as a results.md table."""
    lines = ["| stage | vs | metric | before | after | gain [95% interval] | n | method | shown |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in gains:
        if isinstance(g, NotShown):
            lines.append(f"| {g.stage} | | not measured: {g.reason} | | | | | | no |")
        else:
            note = f" ({g.note})" if g.note else ""
            lines.append(f"| {g.stage} | {g.versus} | {g.metric}{note} | {g.before:.3f} | {g.after:.3f} | "
                         f"{g.delta:+.3f} [{g.low:+.3f}, {g.high:+.3f}] | {g.n} | {g.method} | "
                         f"{'yes' if g.shown else 'no'} |")
    return "\n".join(lines) + "\n"
