"""`raylm reward`: train a reward model (the checkpoint's backbone + a scalar head) on pairwise
preferences with the Bradley-Terry loss, on a Ray Train worker group (FSDP2, checkpoints, failure
recovery: ``actors/train/preference_trainer.py``).

Data: JSONL pairs ``{"prompt", "chosen", "rejected"[, "margin"]}`` and rankings ``{"prompt",
"responses": [best, ..., worst]}`` (all K(K-1)/2 pairs), or ``data.builtin: stdlib-docstrings``, a
task with a known answer built from this Python's standard library: which of two docstring lines
belongs to the function in the prompt (see ``raylm.data.preferences``). The score is read at the last
token of ``<|bos|><|user|>prompt<|end|><|assistant|>response<|end|><|eos|>``.

Reported: held-out pairwise accuracy and mean reward margin, before training and every
``train.eval_every`` steps. The model goes to ``<output_dir>/hf`` as a Hugging Face
``...ForSequenceClassification`` folder (one label) with its tokenizer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylm.config import ConfigError, Section, StageConfig, check_one_data_source, where_relative
from raylm.tracking import StageRun
from raylm.train.config import OptimConfig, ParallelConfig, TrainConfig


class PreferenceDataConfig(Section):
    """The preference pairs: train/validation JSONL files, or the built-in task (not both)."""

    train: str | None = None  # JSONL pairs / rankings
    validation: str | None = None  # held-out JSONL: accuracy and margin
    builtin: Literal["stdlib-docstrings"] | None = None  # instead of train/validation files
    builtin_limit: int | None = Field(default=None, ge=10)  # functions of the built-in task (None: all, ~4,500)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # of the built-in task's functions
    negatives: Literal["same_module", "random"] = "same_module"  # where the built-in rejected answer comes from
    pairs_per_prompt: int = Field(default=1, ge=1)  # built-in training pairs per function (different negatives)
    on_bad_line: Literal["error", "skip"] = "error"  # skip: keep every valid line, bad ones to quarantine.jsonl
    tokenizer: str | None = None  # tokenizer.json; default: the checkpoint's

    @model_validator(mode="after")
    def _one_source(self):
        return check_one_data_source(self)


class FreezeConfig(Section):
    train_layers: int | None = Field(default=None, ge=0)  # None: the whole model; N: last N blocks + head


class PreferenceTrainConfig(TrainConfig):
    steps: int = Field(default=200, ge=1)  # used when epochs is None
    batch_size: int = Field(default=16, ge=1)  # pairs per rank per micro-batch
    seq_len: int = Field(default=128, ge=8)  # longer (prompt, answer) sequences are cut (prompt first)
    eval_every: int = Field(default=50, ge=0)
    eval_batches: int = Field(default=64, ge=1)  # held-out batches per rank per evaluation
    checkpoint_every: int = Field(default=100, ge=1)


class RewardOptimConfig(OptimConfig):
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class RewardLossConfig(Section):
    margin: float = 0.0  # Bradley-Terry margin for pairs without their own "margin": -log sigmoid(r_c - r_r - m)


class Config(StageConfig):
    checkpoint: str = "out/sft/hf"  # Hugging Face folder to start from (`raylm sft` output)
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    epochs: float | None = Field(default=None, gt=0)  # sets train.steps from the training pairs; None: train.steps
    loss: RewardLossConfig = Field(default_factory=RewardLossConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    train: PreferenceTrainConfig = Field(default_factory=PreferenceTrainConfig)
    optim: RewardOptimConfig = Field(default_factory=RewardOptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


# ---- shared with `raylm dpo` -------------------------------------------------------------------------

def check_preference_stage(config, config_path) -> None:
    """Checks of the starting checkpoint, the tokenizer and the data files, before any Ray work."""
    from raylm.data.preferences import PreferenceDataError, read_preferences

    from raylm.pipelines.sft import check_start_checkpoint

    check_start_checkpoint(config, config_path, "raylm sft")
    tokenizer = tokenizer_path(config)
    if not tokenizer.exists():
        raise ConfigError(f"{config_path}: data.tokenizer: no tokenizer.json given or in {config.checkpoint}")
    for key in ("ep", "cp", "pp"):  # the preference loop runs FSDP2 (dp_shard x dp_replicate) and tensor parallel
        if getattr(config.parallel, key) > 1:
            raise ConfigError(f"{config_path}: parallel.{key}: not supported by preference training (use dp_shard, "
                              "dp_replicate, tp)")
    if config.train.fail_at_step is not None:
        raise ConfigError(f"{config_path}: train.fail_at_step: fault injection is pretraining/SFT only")
    if config.data.builtin is None:
        for key in ("train", "validation"):
            path = getattr(config.data, key)
            if path is None or not Path(path).is_file():
                raise ConfigError(f"{config_path}: data.{key}: {path!r} is not a file (or set data.builtin)"
                                  + where_relative(path, config_path))
            try:
                read_preferences(path, config.data.on_bad_line)
            except PreferenceDataError as e:
                raise ConfigError(f"{config_path}: data.{key}:\n{e}") from None


def tokenizer_path(config) -> Path:
    return Path(config.data.tokenizer) if config.data.tokenizer else Path(config.checkpoint) / "tokenizer.json"


def load_pairs(config, stage_run: StageRun, stage: str = "reward") -> dict[str, list[dict]]:
    """The train / validation pairs: read from the JSONL files (bad lines quarantined with file, line
    and field when ``on_bad_line: skip``), or the built-in task (written to ``<output_dir>/pairs/``)."""
    from raylm.data.preferences import read_preferences, stdlib_preference_splits, write_jsonl

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


def preference_spec(config, stage: str, stage_run: StageRun, pairs: dict, tokenizer: str, **fields):
    """What every worker needs (a ``TrainingSpec`` over ``PairData``, with the stage's own
    ``fields``); sets ``train.steps`` from ``epochs`` if given."""
    import math

    from raylm.pipelines.pretrain import training_spec
    from raylm.train.spec import PairData

    if config.epochs is not None:
        per_step = config.train.batch_size * config.train.grad_accum * config.parallel.num_workers // config.parallel.tp
        config.train.steps = max(1, math.ceil(config.epochs * len(pairs["train"]) / per_step))
    stage_run.log_params({"train.steps_resolved": config.train.steps, "data.train_pairs": len(pairs["train"]),
                          "data.validation_pairs": len(pairs["validation"])})
    return training_spec(config, stage, stage_run, init_checkpoint=str(Path(config.checkpoint).resolve()),
                         tokenizer_file=tokenizer, data=PairData(pairs["train"], pairs["validation"], tokenizer),
                         **fields)


def finish(config, stage_run: StageRun, final: dict, started: float, keys: list[str]) -> dict:
    export_dir = config.output_path / "hf"
    stage_run.log_artifact(export_dir, "model")
    summary = {"checkpoint": str(export_dir), "steps": final.get("step"), "wall_s": time.perf_counter() - started,
               **{k: final.get(k) for k in keys}, "ray_checkpoint": final.get("checkpoint_dir"),
               "resumed_from_step": final.get("resumed_from_step")}
    stage_run.log_metrics({"wall_s": summary["wall_s"]})
    return summary


# ---- the stage ---------------------------------------------------------------------------------------

def check(config: Config, config_path) -> None:
    check_preference_stage(config, config_path)


def run(config: Config, stage_run: StageRun) -> dict:
    from raylm.actors.train.preference_trainer import preference_loop
    from raylm.pipelines.pretrain import launch
    from raylm.data.preferences import PreferenceDataError
    from raylm.train.spec import Freeze

    started = time.perf_counter()
    tokenizer = str(tokenizer_path(config).resolve())
    try:
        pairs = load_pairs(config, stage_run)
    except PreferenceDataError as e:
        raise ConfigError(str(e)) from None
    spec = preference_spec(config, "reward", stage_run, pairs, tokenizer, objective="reward",
                           freeze=Freeze(config.freeze.train_layers), reward_margin=config.loss.margin)
    final = launch(config, spec, loop=preference_loop)
    summary = finish(config, stage_run, final, started, ["loss", "accuracy", "margin", "initial_val_accuracy",
                                                         "val_accuracy", "val_margin"])
    print(f"raylm reward: held-out pairwise accuracy {summary['initial_val_accuracy']} -> {summary['val_accuracy']}, "
          f"reward margin {summary['val_margin']}", flush=True)
    return summary
