"""`raylm run`: the lifecycle stages of one config, in order, as one MLflow parent run with a nested
run per stage. Each stage's section is validated by that stage's own config class before anything
starts; a stage that is not built yet stops the run before it starts, and says so.

Lineage: a stage reads what the stage before it wrote unless its section says otherwise:
pretrain trains on <output_dir>/data, SFT starts from <output_dir>/pretrain/hf, the reward model,
DPO and the RLHF policy start from the SFT checkpoint (RLHF scores with the reward model), eval
compares every trained checkpoint side by side, export takes the last trained one. A stage that finished
(its DONE.json is there) is skipped, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import json
import time

from pydantic import Field, field_validator

from raylm.config import ConfigError, StageConfig, deep_merge, format_validation_error, read_yaml
from raylm.stages import LIFECYCLE, StageNotBuilt, built_stages, stage_module
from raylm.tracking import StageRun, start_run, resolve_tracking_uri, stage_run


class Config(StageConfig):
    stages: list[str] = ["export"]
    # A stage's own YAML (e.g. examples/laptop/pretrain.yaml) as the base of its section; the
    # lifecycle's output_dir, seed, tracking, ray and lineage replace that file's, and `sections`
    # override on top, merged key by key (a list replaces the file's list).
    stage_files: dict[str, str] = Field(default_factory=dict)
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


# Stages that write a causal-LM checkpoint to <output_dir>/<stage>/hf, latest-trained first.
TRAINED = ("dpo", "rlhf", "sft", "pretrain")


def lineage(config: Config, stage: str) -> dict:
    """Default inputs of ``stage``: the outputs of the stages before it in this run."""
    out = config.output_path
    before = config.stages[: config.stages.index(stage)]
    trained = [s for s in TRAINED if s in before]
    hf = lambda name: str(out / name / "hf")  # noqa: E731
    tuned = next((s for s in ("sft", "pretrain") if s in before), None)  # what post-training starts from
    if stage == "pretrain" and "data" in before:
        return {"data_dir": str(out / "data")}
    if stage == "sft" and "pretrain" in before:
        return {"checkpoint": hf("pretrain")}
    if stage in ("reward", "dpo") and tuned:
        return {"checkpoint": hf(tuned)}
    if stage == "rlhf":
        inputs: dict = {}
        if tuned:
            inputs["policy"] = {"checkpoint": hf(tuned)}
        if "reward" in before:
            inputs["reward"] = {"checkpoint": hf("reward")}
        return inputs
    if stage == "eval" and trained:
        return {"checkpoints": {s: hf(s) for s in reversed(trained)}}
    if stage == "export" and trained:
        return {"checkpoint": hf(trained[0])}
    return {}


def stage_config(config: Config, stage: str, config_path=None):
    from pydantic import ValidationError

    module = stage_module(stage)
    inherited = {"output_dir": str(config.output_path / stage), "seed": config.seed,
                 "tracking": config.tracking.model_dump(), "ray": config.ray.model_dump(), **lineage(config, stage)}
    base = read_yaml(config.stage_files[stage]) if stage in config.stage_files else {}
    try:
        merged = deep_merge(deep_merge(base, inherited), config.sections.get(stage, {}))
        return module, module.Config.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"{config_path} sections.{stage}", e)) from None


def check(config: Config, config_path) -> None:
    for key in ("sections", "stage_files"):
        for name in getattr(config, key):
            if name not in LIFECYCLE:
                raise ConfigError(f"{config_path}: {key}.{name}: unknown stage")
    for i, stage in enumerate(config.stages):
        try:
            module, stage_cfg = stage_config(config, stage, config_path)
        except StageNotBuilt:
            continue  # reported by run(), which exits 3
        # Later stages' inputs are written by the stages before them: those are checked just
        # before the stage starts.
        if i == 0 and hasattr(module, "check"):
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
            done = stage_cfg.output_path / "DONE.json"
            if done.exists():
                print(f"=== raylm run: stage {stage}: done in an earlier run ({done}), skipped ===", flush=True)
                summary["stages"][stage] = {"skipped": True, **json.loads(done.read_text())}
                continue
            if hasattr(module, "check"):
                module.check(stage_cfg, f"sections.{stage}")
            start = time.perf_counter()
            print(f"=== raylm run: stage {stage} ===", flush=True)
            with stage_run(stage, stage_cfg, parent=parent) as run_handle:
                result = module.run(stage_cfg, run_handle)
            result = {"seconds": round(time.perf_counter() - start, 1), "mlflow_run": run_handle.run_id,
                      **(result or {})}
            done.write_text(json.dumps(result, indent=2, default=str))
            summary["stages"][stage] = result
        summary["plots"] = [str(p) for p in plot_curves(summary, config, parent)]
        status = "FINISHED"
    finally:
        parent.client.set_terminated(parent.run_id, status)
    print_report(summary, config)
    return summary


def plot_curves(summary: dict, config: Config, parent: StageRun) -> list:
    """Loss, reward and KL curves of this run's stages (skipped ones included) as PNGs in
    <output_dir>/plots, logged to the parent run."""
    from raylm.plots import plot_lifecycle

    runs = {stage: r["mlflow_run"] for stage, r in summary["stages"].items() if r.get("mlflow_run")}
    paths = plot_lifecycle(parent.client, runs, config.output_path / "plots")
    for path in paths:
        parent.log_artifact(path, "plots")
    return paths


def print_report(summary: dict, config: Config) -> None:
    print("\n=== raylm run: report ===")
    for stage, result in summary["stages"].items():
        # scalars, and one level of named scalars (e.g. RLHF's before / after reward and KL)
        flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) and k != "mlflow_run"}
        flat.update({f"{k}.{name}": v for k, part in result.items() if isinstance(part, dict) and k != "results"
                     for name, v in part.items() if isinstance(v, (int, float))})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())
        print(f"  {stage}: {shown}")
    table = config.output_path / "eval" / "results.md"
    if "eval" in summary["stages"] and table.exists():
        print("\n  benchmarks, checkpoint by checkpoint (" + str(table) + "):")
        print("    " + table.read_text().strip().replace("\n", "\n    "))
    if summary.get("plots"):
        print(f"\n  plots: {', '.join(summary['plots'])}")
    not_built = [s for s in LIFECYCLE if s not in built_stages()]
    if not_built:
        print(f"  not built yet: {', '.join(not_built)}")
    print(f"  artifacts: {config.output_path.resolve()}")
    print(f"  MLflow: {summary['tracking_uri']} (parent run {summary['mlflow_parent_run']})")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open it with: mlflow ui --backend-store-uri {summary['tracking_uri']}")
