"""The built-in ground-truth task, from the running Python's standard library: what does a function
do? The prompt shows its qualified name and signature; the answer is the first line of its own
docstring.

- SFT (``stdlib_functions`` split by ``split_functions``): prompt -> that line.
- Reward model and DPO (``stdlib_preference_splits``): the line chosen over another function's
  from the same top-level module (a hard negative: same topic, same vocabulary). Train and
  held-out splits are disjoint by function, and negatives are drawn only from the same split.
- RLHF (``stdlib_prompts``): the prompts with their reference answers; ``reference_score`` scores a
  generated answer against the reference (word-overlap F1), the ground truth a reward model should
  agree with.

Every stage splits the same functions the same way (same limit, validation fraction and seed), so
held-out functions are never trained on by any of them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Literal

import numpy as np


def first_line(docstring: str) -> str:
    return docstring.strip().split("\n", 1)[0].strip()


def stdlib_prompt(qualified_name: str, signature: str, max_signature: int = 100) -> str:
    if len(signature) > max_signature:
        signature = signature[: max_signature - 4] + " ...)"
    return f"What does `{qualified_name}{signature}` do?"


def documented_functions() -> Iterator[dict]:
    """Public documented stdlib functions with a first docstring line of 3+ words, one per name:
    ``{"function", "module", "prompt", "reference"}``, in a fixed order."""
    from raylm.data.stdlib_corpus import iter_stdlib_functions

    seen = set()
    for function in iter_stdlib_functions():
        reference = first_line(function.docstring)
        if len(reference.split()) < 3 or function.qualified_name in seen:
            continue
        seen.add(function.qualified_name)
        yield {"function": function.qualified_name, "module": function.qualified_name.split(".")[0],
               "prompt": stdlib_prompt(function.qualified_name, function.signature), "reference": reference}


def stdlib_functions(limit: int | None = None) -> list[dict]:
    """``documented_functions``, all of them or an evenly spread subset of ``limit``."""
    items = list(documented_functions())
    if limit is not None:  # an evenly spread subset, so that a small task still spans many modules
        keep = np.linspace(0, len(items) - 1, num=min(limit, len(items))).round().astype(int)
        items = [items[i] for i in sorted(set(keep.tolist()))]
    return items


def split_functions(items: list[dict], validation_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Disjoint train / validation functions (a seeded permutation)."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(round(len(items) * validation_fraction)))
    return {"train": [items[i] for i in sorted(order[n_val:])], "validation": [items[i] for i in sorted(order[:n_val])]}


def preference_pairs(items: list[dict], negatives: Literal["same_module", "random"] = "same_module",
                     per_prompt: int = 1, seed: int = 0) -> list[dict]:
    """For every function, ``per_prompt`` pairs: its docstring line chosen over another function's.
    ``same_module`` draws the rejected line from the same top-level module when it has another
    function with a different line (else from anywhere); ``random`` from anywhere in ``items``."""
    rng = np.random.default_rng(seed)
    by_module = defaultdict(list)
    for i, item in enumerate(items):
        by_module[item["module"]].append(i)
    pairs = []
    for i, item in enumerate(items):
        pool = by_module[item["module"]] if negatives == "same_module" else []
        pool = [j for j in pool if items[j]["reference"] != item["reference"]]
        picks = []
        for _ in range(per_prompt):
            if pool:
                j = pool[int(rng.integers(len(pool)))]
            else:
                j = int(rng.integers(len(items)))
                while items[j]["reference"] == item["reference"]:
                    j = int(rng.integers(len(items)))
            picks.append(j)
        for j in picks:
            pairs.append({"prompt": item["prompt"], "chosen": item["reference"], "rejected": items[j]["reference"],
                          "function": item["function"], "rejected_function": items[j]["function"]})
    return pairs


def stdlib_preference_splits(limit: int | None = None, validation_fraction: float = 0.1, seed: int = 0,
                             negatives: Literal["same_module", "random"] = "same_module",
                             per_prompt: int = 1) -> dict[str, list[dict]]:
    """The built-in preference task: ``{"train": pairs, "validation": pairs}``, disjoint by function."""
    splits = split_functions(stdlib_functions(limit), validation_fraction, seed)
    return {name: preference_pairs(items, negatives, per_prompt if name == "train" else 1, seed + k)
            for k, (name, items) in enumerate(splits.items())}


def stdlib_prompts(split: Literal["train", "validation"] = "train", limit: int | None = None,
                   validation_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """Prompts of the built-in task for RLHF rollouts, ``{"prompt", "reference", "function"}``: the
    same functions, split the same way, as ``stdlib_preference_splits`` with the same arguments."""
    items = split_functions(stdlib_functions(limit), validation_fraction, seed)[split]
    return [{"prompt": i["prompt"], "reference": i["reference"], "function": i["function"]} for i in items]


_WORD = re.compile(r"[A-Za-z0-9_]+")


def reference_score(response: str, reference: str) -> float:
    """Ground truth for a generated answer: word-overlap F1 (case-folded) with the reference, in [0, 1]."""
    got = [w.lower() for w in _WORD.findall(response)]
    want = [w.lower() for w in _WORD.findall(reference)]
    if not got or not want:
        return 0.0
    counts = defaultdict(int)
    for w in want:
        counts[w] += 1
    common = 0
    for w in got:
        if counts[w] > 0:
            counts[w] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)
