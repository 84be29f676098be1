"""`raylm run`: the lifecycle stages of one config, in order, as one MLflow parent run with a nested
run per stage. Each stage's section is validated by that stage's own config class before anything
starts; a stage that is not built yet stops the run before it starts, and says so.
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator

from raylm.config import ConfigError, StageConfig, format_validation_error
from raylm.stages import LIFECYCLE, StageNotBuilt, built_stages, stage_module
from raylm.tracking import StageRun, start_run, resolve_tracking_uri, stage_run


class Config(StageConfig):
    stages: list[str] = ["export"]
    # One section per stage, validated by that stage's Config (output_dir, seed, tracking and ray
    # are inherited from the top level; the stage writes under <output_dir>/<stage>).
    sections: dict[str, dict] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _known(cls, stages):
        for name in stages:
            if name not in LIFECYCLE:
                raise ValueError(f"unknown stage {name!r}; the lifecycle is {', '.join(LIFECYCLE)}")
        return stages


def stage_config(config: Config, stage: str, config_path=None):
    from pydantic import ValidationError

    module = stage_module(stage)
    inherited = {"output_dir": str(config.output_path / stage), "seed": config.seed,
                 "tracking": config.tracking.model_dump(), "ray": config.ray.model_dump()}
    try:
        return module, module.Config.model_validate({**inherited, **config.sections.get(stage, {})})
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"{config_path} sections.{stage}", e)) from None


def check(config: Config, config_path) -> None:
    for name in config.sections:
        if name not in LIFECYCLE:
            raise ConfigError(f"{config_path}: sections.{name}: unknown stage")
    for stage in config.stages:
        try:
            module, stage_cfg = stage_config(config, stage, config_path)
        except StageNotBuilt:
            continue  # reported by run(), which exits 3
        if hasattr(module, "check"):
            module.check(stage_cfg, f"{config_path} sections.{stage}")


def run(config: Config, tracking_uri: str | None = None) -> dict:
    missing = [s for s in config.stages if s not in built_stages()]
    if missing:
        raise StageNotBuilt(f"stages not built yet: {', '.join(missing)}")
    uri = resolve_tracking_uri(config, tracking_uri)
    parent = start_run(uri, config.tracking.experiment, "lifecycle", config.output_dir)
    summary: dict = {"mlflow_parent_run": parent.run_id, "tracking_uri": uri, "stages": {}}
    status = "FAILED"
    try:
        for stage in config.stages:
            module, stage_cfg = stage_config(config, stage)
            start = time.perf_counter()
            print(f"=== raylm run: stage {stage} ===", flush=True)
            with stage_run(stage, stage_cfg, parent=parent) as run_handle:
                result = module.run(stage_cfg, run_handle)
            summary["stages"][stage] = {"seconds": round(time.perf_counter() - start, 1), **(result or {})}
        status = "FINISHED"
    finally:
        parent.client.set_terminated(parent.run_id, status)
    print_report(summary, config)
    return summary


def print_report(summary: dict, config: Config) -> None:
    print("\n=== raylm run: report ===")
    for stage, result in summary["stages"].items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
        print(f"  {stage}: {shown}")
    not_built = [s for s in LIFECYCLE if s not in built_stages()]
    if not_built:
        print(f"  not built yet: {', '.join(not_built)}")
    print(f"  artifacts: {config.output_path.resolve()}")
    print(f"  MLflow: {summary['tracking_uri']} (parent run {summary['mlflow_parent_run']})")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open it with: mlflow ui --backend-store-uri {summary['tracking_uri']}")
