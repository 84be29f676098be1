"""Every raylm command, registered once: its name, its driver and what it does. The CLI, `raylm run`,
`raylm config`, `raylm submit` and docs/config.md all read this list; none names a stage itself.

A stage's driver is ``raylm.pipelines.<driver>`` (the repository's ``pipelines/<driver>.py``). It
defines ``Config`` (a ``StageConfig``: the typed config), ``run(config, stage_run) -> dict`` (its
key metrics) and optionally ``check(config, config_path)`` (checks that need more than one section,
e.g. that the files it names exist; a ``ConfigError`` before anything starts) and
``WORKER_MODULES`` (what its Ray workers import as they start).

To add a command: one ``Stage(...)`` line in ``STAGES`` below, and its ``pipelines/<driver>.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command: `raylm <name> CONFIG`
    driver: str  # its module under raylm.pipelines
    help: str  # one line: what it does (the CLI's help, docs/config.md)
    lifecycle: bool = False  # one of the stages `raylm run` chains, in the order of STAGES
    ray: bool = True  # runs on Ray: `run_stage` starts (or joins) it before the stage runs
    tracked: bool = True  # a stage with its own MLflow run (not `raylm run`, which opens a parent, nor `submit`)

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"raylm.pipelines.{self.driver}")

    @property
    def config_class(self) -> type:
        return self.module.Config

    def check(self, config, config_path) -> None:
        check = getattr(self.module, "check", None)
        if check is not None:
            check(config, config_path)


# Every command, in the order of `raylm --help` and docs/config.md; the lifecycle ones in the order
# `raylm run` runs them. Add a new command here (one line).
STAGES = [
    Stage("data", "data", "raw text -> deduplicated, filtered, tokenized training shards (Ray Data)", lifecycle=True),
    Stage("pretrain", "pretrain", "pretrain a dense or MoE model on token shards (Ray Train)", lifecycle=True),
    Stage("sft", "sft", "instruction-tune a checkpoint, prompt masked out of the loss", lifecycle=True),
    Stage("reward", "reward", "train a reward model on pairwise preferences", lifecycle=True),
    Stage("rlhf", "rlhf", "PPO with policy, vLLM rollout, reward and reference actor pools", lifecycle=True),
    Stage("dpo", "dpo", "direct preference optimisation against a frozen reference", lifecycle=True),
    Stage("eval", "eval", "perplexity, few-shot benchmarks, preference win rates", lifecycle=True),
    # Ray only for its vLLM check, which starts it when vLLM is installed.
    Stage("export", "export", "build or load a model, export it in Hugging Face format, check it in transformers "
          "and vLLM", lifecycle=True, ray=False),
    Stage("scale", "scale", "scaling laws from a Ray Tune sweep of sizes x FLOP budgets, and a checked compute-optimal plan"),
    Stage("synth", "synth", "synthetic instructions, preference pairs or rephrased text from a model on vLLM engines"),
    Stage("serve", "serve", "serve a checkpoint (and LoRA adapters) on an OpenAI-compatible endpoint (vLLM's server "
          "in a Ray actor)"),
    Stage("run", "lifecycle", "the whole lifecycle as one MLflow parent run", ray=False, tracked=False),
    Stage("submit", "submit", "submit a config to a Ray cluster as a Ray job", ray=False, tracked=False),
]
COMMANDS: dict[str, Stage] = {stage.name: stage for stage in STAGES}
LIFECYCLE = [stage.name for stage in STAGES if stage.lifecycle]


def stage_module(command: str) -> ModuleType:
    if command not in COMMANDS:
        raise KeyError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    return COMMANDS[command].module


def run_stage(stage: Stage, config, tracking_uri: str | None = None, parent=None, lineage: dict | None = None,
              announce: bool = True) -> tuple[dict, str]:
    """Run one stage in its own MLflow run (nested under ``parent`` in `raylm run`). Ray is started
    here, before the MLflow run is set up, so that the workers import the stage's
    ``WORKER_MODULES`` meanwhile. -> (the stage's summary, its MLflow run id)."""
    from raylm.tracking import stage_run

    if stage.ray:
        from raylm.ray_init import init_ray

        init_ray(config.ray, getattr(stage.module, "WORKER_MODULES", ()))
    with stage_run(stage.name, config, parent=parent, uri=tracking_uri, lineage=lineage) as run:
        if announce:
            print(f"raylm {stage.name}: MLflow run {run.run_id} at {run.uri}", flush=True)
        return stage.module.run(config, run) or {}, run.run_id
