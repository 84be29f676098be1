"""The RLHF run's checkpoint, ``<output_dir>/checkpoints/step_N``: the policy's and the critic's
weights and optimizer states (torch DCP, each rank's RNG) and the driver's state (``RunState``: the
policy version, KL coefficient and reward moments; the prompt sampler's position and RNG; the
before-training evaluation and the step history). ``driver_state.json`` is written last: a folder
without it is incomplete, and a rerun resumes from the newest complete one."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from raylm.actors.policy_trainer import PolicyGroup
from raylm.actors.value_trainer import CriticGroup
from raylm.config import ConfigError
from raylm.rl.config import Config
from raylm.rl.ppo import AdaptiveKLController, FixedKLController, RunningMoments
from raylm.rl.prompts import PromptSampler

log = logging.getLogger("raylm.rlhf")

DRIVER_STATE = "driver_state.json"


@dataclass
class RunState:
    """What the driver carries from step to step."""

    version: int = 0  # the policy version the engines serve
    kl_ctl: AdaptiveKLController | FixedKLController | None = None
    moments: RunningMoments | None = None  # reward normalisation


def checkpoint_root(config: Config) -> Path:
    return config.output_path / "checkpoints"


def latest_checkpoint(config: Config) -> Path | None:
    done = sorted(p for p in checkpoint_root(config).glob("step_*") if (p / DRIVER_STATE).exists())
    return done[-1] if done else None


def save_checkpoint(config: Config, policy: PolicyGroup, critic: CriticGroup | None, state: RunState,
                    sampler_state: dict, step: int, record: dict) -> Path:
    """``sampler_state``: the prompt sampler's, as of the next step; ``record``: what else the driver
    keeps (the before-training evaluation and the step history)."""
    folder = checkpoint_root(config) / f"step_{step:06d}"
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete one from a run that died while writing it
    started = time.perf_counter()
    policy.save_state(str((folder / "policy").resolve()))
    if critic is not None:
        critic.save_state(str((folder / "critic").resolve()))
    driver = {"step": step, "policy_version": state.version, "kl_coef": state.kl_ctl.value,
              "reward_moments": state.moments.state_dict() if state.moments is not None else None,
              "sampler": sampler_state, **record}
    (folder / (DRIVER_STATE + ".tmp")).write_text(json.dumps(driver))
    (folder / (DRIVER_STATE + ".tmp")).rename(folder / DRIVER_STATE)
    complete = sorted(p for p in checkpoint_root(config).glob("step_*") if (p / DRIVER_STATE).exists())
    for old in complete[:-config.checkpoint.keep]:
        shutil.rmtree(old)
    log.info("checkpoint %s written in %.1f s", folder, time.perf_counter() - started)
    return folder


def load_checkpoint(folder: Path, policy: PolicyGroup, critic: CriticGroup | None, state: RunState,
                    sampler: PromptSampler) -> dict:
    """Restore what ``save_checkpoint`` wrote into trainers already set up; -> the driver's state."""
    driver = json.loads((folder / DRIVER_STATE).read_text())
    if (critic is not None) != (folder / "critic").exists():
        raise ConfigError(f"{folder}: written by a run {'without' if critic is not None else 'with'} a critic "
                          "(ppo.advantage changed since); use another output_dir or checkpoint.resume: false")
    policy.load_state(str((folder / "policy").resolve()))
    if critic is not None:
        critic.load_state(str((folder / "critic").resolve()))
    state.version = driver["policy_version"]
    state.kl_ctl.value = driver["kl_coef"]
    if state.moments is not None and driver["reward_moments"] is not None:
        state.moments.load_state_dict(driver["reward_moments"])
    sampler.load_state_dict(driver["sampler"])
    return driver
