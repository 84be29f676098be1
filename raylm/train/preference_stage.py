"""What the two preference stages share (`raylm reward`, `raylm dpo`): the data and loop config
sections, the checks before any Ray work, reading the pairs (or building the built-in task) and the
``TrainingSpec`` over them. Both run the one training loop (``actors/train/train_worker.py``) on
their objective of ``raylm.train.objectives``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylm.config import ConfigError, InputPath, Section, check_one_data_source
from raylm.tracking import StageRun
from raylm.train.config import TrainConfig
from raylm.train.launcher import (check_data_files, check_parallel, check_start_checkpoint, check_tokenizer,
                                  training_spec)
from raylm.train.spec import PairData, TrainingSpec


class PreferenceDataConfig(Section):
    """The preference pairs: train/validation JSONL files, or the built-in task (not both)."""

    train: InputPath | None = None  # JSONL pairs / rankings
    validation: InputPath | None = None  # held-out JSONL: accuracy and margin
    builtin: Literal["stdlib-docstrings"] | None = None  # instead of train/validation files
    builtin_limit: int | None = Field(default=None, ge=10)  # functions of the built-in task (None: all, ~4,500)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # of the built-in task's functions
    negatives: Literal["same_module", "random"] = "same_module"  # where the built-in rejected answer comes from
    pairs_per_prompt: int = Field(default=1, ge=1)  # built-in training pairs per function (different negatives)
    on_bad_line: Literal["error", "skip"] = "error"  # skip: keep every valid line, bad ones to quarantine.jsonl
    tokenizer: InputPath | None = None  # tokenizer.json; default: the checkpoint's

    @model_validator(mode="after")
    def _one_source(self):
        return check_one_data_source(self)


class PreferenceTrainConfig(TrainConfig):
    steps: int = Field(default=200, ge=1)  # used when epochs is None
    batch_size: int = Field(default=16, ge=1)  # pairs per rank per micro-batch
    seq_len: int = Field(default=128, ge=8)  # longer (prompt, answer) sequences are cut (prompt first)
    eval_every: int = Field(default=50, ge=0)
    eval_batches: int = Field(default=64, ge=1)  # held-out batches per rank per evaluation
    checkpoint_every: int = Field(default=100, ge=1)


def check_preference_stage(config, config_path) -> None:
    """Checks of the starting checkpoint, the tokenizer and the data files, before any Ray work."""
    from raylm.data.preferences import PreferenceDataError, read_preferences

    check_start_checkpoint(config, config_path, "raylm sft")
    check_tokenizer(config, config_path)
    for key in ("ep", "cp", "pp"):  # the preference loop runs FSDP2 (dp_shard x dp_replicate) and tensor parallel
        if getattr(config.parallel, key) > 1:
            raise ConfigError(f"{config_path}: parallel.{key}: not supported by preference training (use dp_shard, "
                              "dp_replicate, tp)")
    check_parallel(config, config_path)  # with cp and pp 1: train.fail_rank against the workers
    check_data_files(config, config_path, lambda path: read_preferences(path, config.data.on_bad_line),
                     PreferenceDataError, separator="\n")


def load_pairs(config, stage_run: StageRun, stage: str = "reward") -> dict[str, list[dict]]:
    """The train / validation pairs: read from the JSONL files (bad lines quarantined with file, line
    and field when ``on_bad_line: skip``), or the built-in task (written to ``<output_dir>/pairs/``)."""
    from raylm.data.jsonl import write_jsonl
    from raylm.data.preferences import read_preferences
    from raylm.data.stdlib_task import stdlib_preference_splits

    data = config.data
    out = config.output_path
    if data.builtin is not None:
        splits = stdlib_preference_splits(data.builtin_limit, data.validation_fraction, config.seed, data.negatives,
                                          data.pairs_per_prompt)
        for name, pairs in splits.items():
            write_jsonl(pairs, out / "pairs" / f"{name}.jsonl")
        return splits
    splits, bad = {}, []
    for name in ("train", "validation"):
        splits[name], bad_lines = read_preferences(getattr(data, name), data.on_bad_line)
        bad += bad_lines
    if bad:
        quarantine = write_jsonl(bad, out / "quarantine.jsonl")
        stage_run.log_artifact(quarantine)
        print(f"[{stage}] {len(bad)} bad lines skipped (file, line, field in {quarantine})", flush=True)
    stage_run.log_metrics({"bad_lines": len(bad)})
    return splits


def preference_spec(config, stage: str, stage_run: StageRun, pairs: dict, tokenizer: str, **fields) -> TrainingSpec:
    """What every worker needs (a ``TrainingSpec`` over ``PairData``, with the stage's own
    ``fields``); sets ``train.steps`` from ``epochs`` if given."""
    if config.epochs is not None:
        per_step = config.train.batch_size * config.train.grad_accum * config.parallel.num_workers // config.parallel.tp
        config.train.steps = max(1, math.ceil(config.epochs * len(pairs["train"]) / per_step))
    stage_run.log_params({"train.steps_resolved": config.train.steps, "data.train_pairs": len(pairs["train"]),
                          "data.validation_pairs": len(pairs["validation"])})
    return training_spec(config, stage, stage_run, init_checkpoint=str(Path(config.checkpoint).resolve()),
                         tokenizer_file=tokenizer, data=PairData(pairs["train"], pairs["validation"], tokenizer),
                         **fields)
