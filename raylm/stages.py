"""Which stages exist, in lifecycle order, and where each one's driver lives.

A stage's driver is ``raylm.pipelines.<stage>`` (the repository's ``pipelines/<stage>.py``) and
defines ``Config`` (a ``StageConfig``) and ``run(config, stage_run) -> dict`` (its key metrics).
A stage whose module does not exist yet is reported as not built, never pretended.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The lifecycle, in the order `raylm run` runs it.
LIFECYCLE = ["data", "pretrain", "sft", "reward", "rlhf", "dpo", "eval", "export"]
# Every CLI command -> its driver module under raylm.pipelines.
COMMANDS = {**{stage: stage for stage in LIFECYCLE}, "serve": "serve", "run": "lifecycle", "submit": "submit"}


class StageNotBuilt(Exception):
    pass


def stage_module(command: str) -> ModuleType:
    if command not in COMMANDS:
        raise KeyError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    name = f"raylm.pipelines.{COMMANDS[command]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise StageNotBuilt(f"`raylm {command}` is not built yet (no pipelines/{COMMANDS[command]}.py)") from None
        raise


def built_stages() -> list[str]:
    built = []
    for stage in LIFECYCLE:
        try:
            stage_module(stage)
        except StageNotBuilt:
            continue
        built.append(stage)
    return built
