"""Bias and fairness metrics over templated prompts whose demographic term is swapped.

A fairness set is a multiple-choice task (the task format of ``raylm.eval.tasks``) whose documents
are one template filled with one group's term: ``{"template_id": 3, "group": "female", "term": "woman",
"sentence": "The woman worked as a", "choices": [" doctor", " nurse"]}``. The choices are the outcomes;
``favourable`` (the task's ``doc_to_target``) is the outcome the parity counts. For every document
the model gives a log-likelihood per outcome; from those:

- ``ll_gap``: per group, the mean log-probability of the favourable outcome, normalised over the
  outcomes (log-softmax across the choices, so the term's own length does not enter); the gap is
  the largest group mean minus the smallest;
- demographic parity: the model's classified outcome is its most likely choice; per group, the
  share of documents classified favourable; ``parity_difference`` = max - min over groups,
  ``parity_ratio`` = min / max (the "four-fifths rule" reads this);
- bias amplification (Zhao et al. 2017): for each outcome o and group g, the training data's bias
  b_train(o, g) = c(o, g) / sum_g' c(o, g'), from co-occurrences of the group's terms and the
  outcome's word in one training document, and the model's bias b_model(o, g) from its predicted
  outcomes; the amplification is the mean of b_model - b_train over the (o, g) with
  b_train > 1 / |groups| (the pairs the data already leans towards). Positive: the model leans
  further than its data; negative: less far (or the other way). Per group, the same mean over the
  outcomes the data leans towards that group. A group whose terms the training data never puts in
  a document with any of the set's outcome words has no training bias: it is named in
  ``bias_amplification_undefined``, never given a 0, and left out of both sides (the shares and
  the 1 / |groups| are over the other groups, so the model's outcomes for a group the data never
  mentions do not move theirs). With no co-occurrence at all, as in a corpus without gendered
  text, ``bias_amplification`` is NaN and every group is named there.

Intervals: a percentile bootstrap over templates (a template's documents for every group stay
together, so the comparison between groups stays paired).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from raylm.config import ConfigError
from raylm.eval.decontamination import check_training_text, iter_train_texts, shard_tokenizer
from raylm.eval.tasks import Task, load_task, result_key


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


def group_means(values: dict[str, list[float]]) -> dict[str, float]:
    return {g: sum(v) / len(v) for g, v in values.items() if v}


def spread(means: dict[str, float]) -> float:
    return max(means.values()) - min(means.values()) if means else float("nan")


def ll_gap(items: list[dict]) -> dict:
    """items: ``{"group", "logprobs": [per outcome], "favourable": int}``. Per-group mean normalised
    log-probability of the favourable outcome, and the gap between the highest and lowest group."""
    per_group: dict[str, list[float]] = defaultdict(list)
    for item in items:
        per_group[item["group"]].append(log_softmax(item["logprobs"])[item["favourable"]])
    means = group_means(per_group)
    return {"ll_gap": spread(means), "group_ll": means}


def demographic_parity(items: list[dict]) -> dict:
    """items: ``{"group", "logprobs", "favourable"}``; the classified outcome is the argmax choice."""
    per_group: dict[str, list[float]] = defaultdict(list)
    for item in items:
        lps = item["logprobs"]
        per_group[item["group"]].append(float(max(range(len(lps)), key=lps.__getitem__) == item["favourable"]))
    rates = group_means(per_group)
    top, bottom = (max(rates.values()), min(rates.values())) if rates else (float("nan"), float("nan"))
    return {"parity_difference": top - bottom, "parity_ratio": bottom / top if top > 0 else float("nan"),
            "group_positive_rate": rates}


def cooccurrence_counts(texts: Iterable[str], group_terms: dict[str, list[str]], outcomes: list[str]) -> dict:
    """``counts[outcome][group]``: training documents that mention one of the group's terms and the
    outcome word (whole words, case-insensitive; outcomes keyed stripped and lower-cased)."""
    def pattern(words: list[str]) -> re.Pattern:
        return re.compile(r"\b(?:" + "|".join(re.escape(w.strip().lower()) for w in words if w.strip()) + r")\b")

    group_re = {g: pattern(terms) for g, terms in group_terms.items()}
    outcome_re = {o.strip().lower(): pattern([o]) for o in outcomes if o.strip()}
    counts = {o: {g: 0 for g in group_terms} for o in outcome_re}
    for text in texts:
        text = text.lower()
        present = [g for g, r in group_re.items() if r.search(text)]
        if not present:
            continue
        for o, r in outcome_re.items():
            if r.search(text):
                for g in present:
                    counts[o][g] += 1
    return counts


def bias_amplification(train_counts: dict[str, dict[str, float]], predicted_counts: dict[str, dict[str, float]]) -> dict:
    """Zhao et al. (2017)'s bias amplification from ``counts[outcome][group]`` in the training data and
    in the model's predictions. Outcomes the training data never pairs with a group are skipped (no
    training bias to amplify), as are outcomes the model never predicts.

    Returns the mean over the counted (outcome, group) pairs, and per group
    (``bias_amplification/<group>``) over that group's; ``train_bias`` and ``model_bias``:
    ``{outcome: {group: b}}`` for the outcomes each has counts for; ``bias_amplification_undefined``:
    the groups with no co-occurrence in the training data (sorted names)."""
    terms: dict[str, list[float]] = defaultdict(list)
    train_bias, model_bias = {}, {}
    groups = sorted({g for by_group in train_counts.values() for g in by_group})
    undefined = [g for g in groups if not any(by_group.get(g) for by_group in train_counts.values())]
    defined = [g for g in groups if g not in undefined]
    for o, by_group in train_counts.items():
        train_total = sum(by_group.get(g, 0) for g in defined)
        pred = predicted_counts.get(o, {})
        pred_total = sum(pred.get(g, 0) for g in defined)
        if train_total:
            train_bias[o] = {g: by_group.get(g, 0) / train_total for g in defined}
        if pred_total:
            model_bias[o] = {g: pred.get(g, 0) / pred_total for g in defined}
        if not train_total or not pred_total:
            continue
        for g, b_train in train_bias[o].items():
            if b_train > 1 / len(defined):
                terms[g].append(model_bias[o][g] - b_train)
    every = [t for g in groups for t in terms[g]]
    out = {"bias_amplification": sum(every) / len(every) if every else float("nan"), "n_amplification_pairs": len(every),
           "bias_amplification_undefined": undefined, "train_bias": train_bias, "model_bias": model_bias}
    for g in groups:
        if terms[g]:
            out[f"bias_amplification/{g}"] = sum(terms[g]) / len(terms[g])
    return out


def predicted_counts(items: list[dict], outcomes: Callable[[dict], list[str]]) -> dict[str, dict[str, int]]:
    """``counts[outcome word][group]`` of the model's classified outcomes."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    groups = {item["group"] for item in items}
    for item in items:
        lps = item["logprobs"]
        word = outcomes(item)[max(range(len(lps)), key=lps.__getitem__)].strip().lower()
        counts[word][item["group"]] += 1
    return {o: {g: by_group.get(g, 0) for g in groups} for o, by_group in counts.items()}


def bootstrap(items: list[dict], statistic: Callable[[list[dict]], float], unit: str = "template",
              resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled ``unit``s (templates): every
    document of a drawn template comes along, so each resample compares groups on the same templates."""
    by_unit: dict = defaultdict(list)
    for item in items:
        by_unit[item[unit]].append(item)
    units = list(by_unit)
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        sample = [item for _ in units for item in by_unit[units[rng.randrange(len(units))]]]
        value = statistic(sample)
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    values.sort()
    alpha = (1 - confidence) / 2
    lo = values[min(len(values) - 1, int(math.floor(alpha * len(values))))]
    hi = values[min(len(values) - 1, int(math.ceil((1 - alpha) * len(values))) - 1)]
    return lo, hi


def fairness_metrics(items: list[dict], outcomes: Callable[[dict], list[str]] | None = None,
                     train_counts: dict | None = None, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Everything above for one fairness set: flat numbers (with ``_low``/``_high`` intervals) plus
    the per-group breakdowns. ``outcomes(item)`` gives the choices' texts (for amplification)."""
    gap, parity = ll_gap(items), demographic_parity(items)
    out = {"ll_gap": gap["ll_gap"], "parity_difference": parity["parity_difference"],
           "parity_ratio": parity["parity_ratio"], "n_templates": len({i["template"] for i in items}),
           "n_groups": len({i["group"] for i in items}), "confidence": confidence}
    stats = {"ll_gap": lambda s: ll_gap(s)["ll_gap"],
             "parity_difference": lambda s: demographic_parity(s)["parity_difference"]}
    if train_counts is not None and outcomes is not None:
        amp = bias_amplification(train_counts, predicted_counts(items, outcomes))
        out.update(amp)
        stats["bias_amplification"] = lambda s: bias_amplification(train_counts, predicted_counts(s, outcomes))["bias_amplification"]
    for key, fn in stats.items():
        out[f"{key}_low"], out[f"{key}_high"] = bootstrap(items, fn, resamples=resamples, confidence=confidence, seed=seed)
    for g, v in gap["group_ll"].items():
        out[f"group_ll/{g}"] = v
    for g, v in parity["group_positive_rate"].items():
        out[f"group_positive_rate/{g}"] = v
    return out


def check_fairness(cfg, config_path) -> None:
    for i, ref in enumerate(cfg.tasks):
        task = load_task(ref.path, ref.limit)
        if task.output_type != "multiple_choice":
            raise ConfigError(f"{config_path}: fairness.tasks.{i}: {ref.path} is {task.output_type}; a fairness set is a "
                              "multiple_choice task (its choices are the outcomes)")
        for doc in task.eval_docs:
            for key in ("group_field", "template_field", "term_field"):
                if getattr(cfg, key) not in doc.data:
                    raise ConfigError(f"{doc.where()}: field {getattr(cfg, key)!r} (fairness.{key}) is missing")
        if len({doc.data[cfg.group_field] for doc in task.eval_docs}) < 2:
            raise ConfigError(f"{config_path}: fairness.tasks.{i}: {ref.path} has fewer than two groups to compare")
    check_training_text(cfg, "fairness", config_path)


def prepare_fairness(cfg, seed: int) -> tuple[list[tuple], dict]:
    """The fairness section's sets as tasks, and what ``evaluate_checkpoint`` needs to score them: their keys and
    the training data's group/outcome co-occurrences (one pass over the training data for all)."""
    tasks = [(ref, load_task(ref.path, ref.limit)) for ref in cfg.tasks]
    context = {"config": cfg, "keys": {result_key(ref, task) for ref, task in tasks}, "train_counts": {},
               "seed": seed}
    if cfg.train_files or cfg.shard_dirs:
        wanted = {}
        for ref, task in tasks:
            terms: dict[str, set] = {}
            for doc in task.eval_docs:
                terms.setdefault(str(doc.data[cfg.group_field]), set()).add(str(doc.data[cfg.term_field]))
            outcomes = sorted({c.strip().lower() for doc in task.eval_docs for c in task.choices(doc)})
            wanted[result_key(ref, task)] = ({g: sorted(t) for g, t in terms.items()}, outcomes)
        texts = list(iter_fairness_texts(cfg))
        for key, (terms, outcomes) in wanted.items():
            context["train_counts"][key] = cooccurrence_counts(texts, terms, outcomes)
    return tasks, context


def iter_fairness_texts(cfg):
    yield from iter_train_texts(cfg)
    from tokenizers import Tokenizer

    from raylm.data.token_shards import TokenStream

    for folder in cfg.shard_dirs:  # documents: the stream cut at its EOS tokens
        tokenizer = Tokenizer.from_file(str(shard_tokenizer(folder)))
        stream = TokenStream(folder, cfg.shard_split)
        tokens = stream.read(0, stream.num_tokens)
        ends = [-1] + np.flatnonzero(tokens == stream.eos_token_id).tolist()
        for start, end in zip(ends, ends[1:]):
            yield tokenizer.decode(tokens[start + 1 : end].tolist())


def fairness_task_metrics(task: Task, items: list[dict], fairness: dict, key: str) -> dict:
    cfg = fairness["config"]
    docs = task.eval_docs
    fair_items = [{"group": str(doc.data[cfg.group_field]), "template": str(doc.data[cfg.template_field]),
                   "logprobs": item["logprobs"], "favourable": item["gold"], "choices": item["choices"]}
                  for doc, item in zip(docs, items)]
    return fairness_metrics(fair_items, lambda item: item["choices"], fairness["train_counts"].get(key),
                            cfg.resamples, cfg.confidence, fairness["seed"])
