"""Instruction data for the SFT tests, from the running Python's standard library (the built-in
task's prompts and answers, ``raylm.data.stdlib_task``), written as train/validation JSONL."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from raylm.data.jsonl import write_jsonl
from raylm.data.stdlib_task import documented_functions


def stdlib_instructions(limit: int | None = None) -> list[dict]:
    """The first ``limit`` documented stdlib functions as ``{"prompt", "response"}``: "What does
    `module.function(signature)` do?" answered with the first line of its docstring."""
    return [{"prompt": item["prompt"], "response": item["reference"]}
            for item in itertools.islice(documented_functions(), limit)]


def write_jsonl_splits(examples: list[dict], out_dir: str | Path, validation_fraction: float, seed: int) -> dict:
    """Shuffle once with ``seed`` and write ``train.jsonl`` / ``validation.jsonl``; returns their paths."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, int(len(examples) * validation_fraction))
    return {split: str(write_jsonl([examples[i] for i in indices], Path(out_dir) / f"{split}.jsonl"))
            for split, indices in (("validation", order[:n_val]), ("train", order[n_val:]))}
