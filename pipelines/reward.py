"""`raylm reward`: train a reward model (the checkpoint's backbone + a scalar head) on pairwise
preferences with the Bradley-Terry loss, on a Ray Train worker group (FSDP2, checkpoints, failure
recovery: the one training loop, ``actors/train/train_worker.py``, on ``raylm.train.objectives.BradleyTerry``).

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

from pydantic import Field

from raylm.config import ConfigError, InputPath, Section, StageConfig
from raylm.tracking import StageRun
from raylm.train.config import FreezeConfig, OptimConfig, ParallelConfig
from raylm.train.launcher import finish, launch, tokenizer_path
from raylm.train.preference_stage import (PreferenceDataConfig, PreferenceTrainConfig, check_preference_stage,
                                          load_pairs, preference_spec)


class RewardOptimConfig(OptimConfig):
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class RewardLossConfig(Section):
    margin: float = 0.0  # Bradley-Terry margin for pairs without their own "margin": -log sigmoid(r_c - r_r - m)


class Config(StageConfig):
    checkpoint: InputPath = "out/sft/hf"  # Hugging Face folder to start from (`raylm sft` output)
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    epochs: float | None = Field(default=None, gt=0)  # sets train.steps from the training pairs; None: train.steps
    loss: RewardLossConfig = Field(default_factory=RewardLossConfig)  # the pairwise Bradley-Terry loss
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    # the training loop over preference pairs: steps, batch, evaluation, checkpoints
    train: PreferenceTrainConfig = Field(default_factory=PreferenceTrainConfig)
    # AdamW and its warmup + cosine learning-rate schedule
    optim: RewardOptimConfig = Field(default_factory=RewardOptimConfig)
    # Ray Train workers and how the model is split over them (FSDP, TP, EP, CP, PP)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def check(config: Config, config_path) -> None:
    check_preference_stage(config, config_path)


def run(config: Config, stage_run: StageRun) -> dict:
    from raylm.data.preferences import PreferenceDataError
    from raylm.train.spec import Freeze

    started = time.perf_counter()
    tokenizer = str(tokenizer_path(config).resolve())
    try:
        pairs = load_pairs(config, stage_run)
    except PreferenceDataError as e:
        raise ConfigError(str(e)) from None
    spec = preference_spec(config, "reward", stage_run, pairs, tokenizer, objective="reward",
                           freeze=Freeze(config.freeze.train_layers, config.freeze.train_from),
                           reward_margin=config.loss.margin)
    final = launch(config, spec)
    summary = finish(config, stage_run, final, started, {k: final.get(k) for k in (
        "loss", "accuracy", "margin", "initial_val_accuracy", "val_accuracy", "val_margin")})
    print(f"raylm reward: held-out pairwise accuracy {summary['initial_val_accuracy']} -> {summary['val_accuracy']}, "
          f"reward margin {summary['val_margin']}", flush=True)
    return summary
