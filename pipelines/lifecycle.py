"""`raylm run`: the lifecycle stages of one config, in order, as one MLflow parent run with a nested
run per stage. Each stage's section is validated by that stage's own config class before anything
starts.

Lineage: a stage reads what the stage before it wrote unless its section says otherwise:
pretrain trains on <output_dir>/data, SFT starts from <output_dir>/pretrain/hf, the reward model,
DPO and the RLHF policy start from the SFT checkpoint (RLHF scores with the reward model), eval
compares every trained checkpoint side by side, export takes the last trained one. A stage that finished
(its DONE.json is there) is skipped, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from pydantic import Field, field_validator

from raylm.config import (ConfigError, InputPath, StageConfig, deep_merge, flatten, format_validation_error,
                          read_yaml, resolve_input_paths, resolved_dict)
from raylm.stages import COMMANDS, LIFECYCLE, run_stage, stage_module
from raylm.tracking import StageRun, start_run, resolve_tracking_uri


class Config(StageConfig):
    stages: list[str] = ["export"]  # the lifecycle stages to run, in order (a finished one is skipped)
    # A stage's own YAML (e.g. examples/laptop/pretrain.yaml) as the base of its section; the
    # lifecycle's output_dir, seed, tracking, ray and lineage replace that file's, and `sections`
    # override on top, merged key by key (a list replaces the file's list).
    stage_files: dict[str, InputPath] = Field(default_factory=dict)
    # One section per stage, validated by that stage's Config (output_dir, seed, tracking and ray
    # are inherited from the top level; the stage writes under <output_dir>/<stage>).
    sections: dict[str, dict] = Field(default_factory=dict)
    # Serve the final model once the stages are done: a `raylm serve` section (its checkpoint defaults
    # to the exported, else the last trained, model of this run); null: end without serving.
    serve: dict | None = None

    @classmethod
    def resolve_nested_input_paths(cls, data: dict, base: Path) -> dict:
        """`sections` and `serve` are each a stage's config: their input paths, like the stage
        files', are relative to this file's folder."""
        data = dict(data)
        if isinstance(data.get("sections"), dict):
            data["sections"] = {stage: resolve_input_paths(section, stage_module(stage).Config, base)
                                if stage in LIFECYCLE and isinstance(section, dict) else section
                                for stage, section in data["sections"].items()}
        if isinstance(data.get("serve"), dict):
            data["serve"] = resolve_input_paths(data["serve"], stage_module("serve").Config, base)
        return data

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

    module = COMMANDS[stage].module
    inherited = {"output_dir": str(config.output_path / stage), "seed": config.seed,
                 "tracking": config.tracking.model_dump(), "ray": config.ray.model_dump(), **lineage(config, stage)}
    base = {}
    if stage in config.stage_files:  # its input paths are relative to its own folder
        stage_file = Path(config.stage_files[stage])
        base = resolve_input_paths(read_yaml(stage_file), module.Config, stage_file.parent)
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
        _, stage_cfg = stage_config(config, stage, config_path)
        # Later stages' inputs are written by the stages before them: those are checked just
        # before the stage starts.
        if i == 0:
            COMMANDS[stage].check(stage_cfg, f"{config_path} sections.{stage}")
    if config.serve is not None:
        serve_config(config, config_path)  # its keys now; its checkpoint is written by the stages


def run(config: Config, tracking_uri: str | None = None) -> dict:
    uri = resolve_tracking_uri(config, tracking_uri)
    parent = start_run(uri, config.tracking.experiment, "lifecycle", config.output_dir)
    parent.log_params(flatten(resolved_dict(config)))
    summary: dict = {"mlflow_parent_run": parent.run_id, "tracking_uri": uri, "stages": {}}
    status = "FAILED"
    try:
        for stage in config.stages:
            _, stage_cfg = stage_config(config, stage)
            done = stage_cfg.output_path / "DONE.json"
            if done.exists():
                print(f"=== raylm run: stage {stage}: done in an earlier run ({done}), skipped ===", flush=True)
                summary["stages"][stage] = {"skipped": True, **json.loads(done.read_text())}
                log_stage_results(parent, stage, summary["stages"][stage])
                continue
            COMMANDS[stage].check(stage_cfg, f"sections.{stage}")
            start = time.perf_counter()
            print(f"=== raylm run: stage {stage} ===", flush=True)
            result, run_id = run_stage(COMMANDS[stage], stage_cfg, parent=parent,
                                       lineage=run_lineage(config, stage, summary), announce=False)
            result = {"seconds": round(time.perf_counter() - start, 1), "mlflow_run": run_id, **result}
            done.write_text(json.dumps(result, indent=2, default=str))
            summary["stages"][stage] = result
            log_stage_results(parent, stage, result)
        log_eval_table(parent, config)
        summary["gains"] = log_gains(parent, config, summary)
        summary["plots"] = [str(p) for p in plot_curves(summary, config, parent)]
        summary["registered_model"] = register_final_model(parent, config, summary)
        status = "FINISHED"
    finally:
        parent.client.set_terminated(parent.run_id, status)
    print_report(summary, config)
    if config.serve is not None:
        summary["serve"] = serve_final_model(config, parent)
    return summary


def serve_config(config: Config, config_path=None):
    """The ``serve:`` section as a `raylm serve` config, with this run's final model as its checkpoint."""
    from pydantic import ValidationError

    final = next((s for s in ("export", *TRAINED) if s in config.stages), None)
    inherited = {"output_dir": str(config.output_path / "serve"), "seed": config.seed,
                 "tracking": config.tracking.model_dump(), "ray": config.ray.model_dump()}
    if final is not None:
        inherited["checkpoint"] = str(config.output_path / final / "hf")
    try:
        return COMMANDS["serve"].config_class.model_validate(deep_merge(inherited, config.serve or {}))
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"{config_path} serve", e)) from None


def serve_final_model(config: Config, parent: StageRun) -> dict:
    serve_cfg = serve_config(config)
    try:
        COMMANDS["serve"].check(serve_cfg, "serve")
    except ConfigError as e:  # the stages' work is done and kept: say why it is not served
        print(f"raylm run: not serving the final model: {e}", file=sys.stderr, flush=True)
        return {"error": str(e)}
    print("=== raylm run: serving the final model ===", flush=True)
    return run_stage(COMMANDS["serve"], serve_cfg, parent=parent, announce=False)[0]


def metric_name(*parts: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /``: anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", "/".join(parts))


def headline_metrics(stage: str, result: dict) -> dict[str, float]:
    """A stage's summary as parent-run metrics: its numbers, and one level of named numbers (RLHF's
    before / after reward, eval's checkpoint -> task -> metric), ``<stage>/<key>[/<name>...]``."""
    metrics = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, bool) or key in ("mlflow_run", "skipped"):
                continue
            if isinstance(value, (int, float)):
                metrics[metric_name(*path, str(key))] = float(value)
            elif isinstance(value, dict) and len(path) < 4:
                walk(value, path + [str(key)])

    walk(result, [stage])
    return metrics


def log_stage_results(parent: StageRun, stage: str, result: dict) -> None:
    """The stage's headline results on the parent run, and which run made them."""
    parent.log_metrics(headline_metrics(stage, result))
    if result.get("mlflow_run"):
        parent.set_tags({f"raylm.run.{stage}": result["mlflow_run"]})


def log_eval_table(parent: StageRun, config: Config) -> None:
    """The eval stage's checkpoint-by-checkpoint table, on the parent run too."""
    out = config.output_path / "eval"
    for name in ("results.md", "results.json"):
        if (out / name).exists():
            parent.log_artifact(out / name, "eval")


def held_out_pairs(config: Config, stage: str) -> int | None:
    """How many held-out pairs the reward / DPO stage scored: its validation file's pairs, at most
    what its eval_batches reach (raylm.train.objectives.PreferencePairs.evaluate)."""
    from pathlib import Path

    _, stage_cfg = stage_config(config, stage)
    validation = getattr(stage_cfg.data, "validation", None)
    if not validation or not Path(validation).exists():
        return None
    with open(validation, "rb") as f:
        n = sum(1 for line in f if line.strip())
    per_rank = -(-n // stage_cfg.parallel.num_workers)
    reached = stage_cfg.train.eval_batches * stage_cfg.train.batch_size
    return n if reached >= per_rank else reached * stage_cfg.parallel.num_workers


def measure_gains(config: Config, summary: dict) -> list:
    """Each stage's gain over the one before it on held-out items (raylm.eval.gains)."""
    from raylm.eval.gains import stage_gains

    stages = {s: r for s, r in summary["stages"].items() if s in config.stages}
    eval_file = config.output_path / "eval" / "results.json"
    eval_results = json.loads(eval_file.read_text()).get("results") if eval_file.exists() else None
    data_dir = None
    if "pretrain" in stages:
        _, pretrain_cfg = stage_config(config, "pretrain")
        data_dir = pretrain_cfg.data_dir
    pairs = {s: held_out_pairs(config, s) for s in ("reward", "dpo") if s in stages}
    return stage_gains(stages, eval_results, data_dir, {s: n for s, n in pairs.items() if n})


def log_gains(parent: StageRun, config: Config, summary: dict) -> list[dict]:
    """The stages' gains as parent-run metrics (``gain/<stage>/...``) and <output_dir>/gains.json."""
    gains = [g.as_dict() for g in measure_gains(config, summary)]
    for g in gains:
        if "delta" in g:
            key = metric_name("gain", g["stage"], g["versus"], g["metric"].split(" (")[0])
            parent.log_metrics({key: g["delta"], f"{key}/low": g["low"], f"{key}/high": g["high"]})
    path = config.output_path / "gains.json"
    path.write_text(json.dumps(gains, indent=2))
    parent.log_artifact(path)
    return gains


def run_lineage(config: Config, stage: str, summary: dict) -> dict:
    """Registry tags only the lifecycle knows: the runs that made this stage's inputs."""
    runs = {name: r["mlflow_run"] for name, r in summary["stages"].items() if r.get("mlflow_run")}
    inputs = json.dumps(lineage(config, stage))
    read = [name for name in runs if name != "data" and str(config.output_path / name) in inputs]
    tags = {"raylm.lifecycle_run": summary["mlflow_parent_run"], "raylm.data_run": runs.get("data"),
            "raylm.parent_run": ", ".join(runs[name] for name in read) or None}
    return {k: v for k, v in tags.items() if v}


def register_final_model(parent: StageRun, config: Config, summary: dict) -> str | None:
    """The lifecycle's model (the export's, else the last trained stage's) as ``<experiment>`` in
    the Model Registry, tagged with the runs it came from."""
    if not config.tracking.registry:
        return None
    last = next((s for s in ("export", *TRAINED) if s in summary["stages"] and summary["stages"][s].get("mlflow_run")),
                None)
    if last is None:
        return None
    source = StageRun(parent.uri, summary["stages"][last]["mlflow_run"], parent.experiment_id)
    tags = {"raylm.stage": last, "raylm.lifecycle_run": parent.run_id,
            **{f"raylm.run.{s}": r.get("mlflow_run") for s, r in summary["stages"].items() if r.get("mlflow_run")}}
    try:
        version = source.register_model(config.tracking.experiment, tags)
    except Exception as e:  # the run's work is done and logged: say so, do not fail it
        print(f"raylm run: the final model was not registered in MLflow's Model Registry ({e})", flush=True)
        return None
    if version is None:
        return None
    parent.set_tags({"raylm.registered_model": f"{version.name}/{version.version}"})
    return f"{version.name}/{version.version}"


def plot_curves(summary: dict, config: Config, parent: StageRun) -> list:
    """Loss, reward and KL curves of this run's stages (skipped ones included) as PNGs in
    <output_dir>/plots, logged to the parent run."""
    from raylm.plots import plot_lifecycle

    runs = {stage: r["mlflow_run"] for stage, r in summary["stages"].items() if r.get("mlflow_run")}
    paths = plot_lifecycle(parent.client, runs, config.output_path / "plots")
    for path in paths:
        parent.log_artifact(path, "plots")
    return paths


def report_text(summary: dict, config: Config) -> str:
    """The run's results as Markdown (<output_dir>/results.md): each stage's gain over the one before
    it with its 95% interval, the stages' wall times, the eval table."""
    from raylm.eval.gains import from_dict, markdown_gains

    lines = [f"# raylm run {config.output_dir}: what each stage gained", ""]
    gains = summary.get("gains") or []
    if gains:
        rows = [from_dict(g) for g in gains]
        lines += ["Held-out items only; the interval is 95%; a gain is shown when the whole interval is above 0.", "",
                  *[f"- {r.line()}" for r in rows], "", markdown_gains(rows)]
    times = {s: r.get("seconds") for s, r in summary["stages"].items()}
    lines += ["## Stage times (s)", "", "| stage | seconds | |", "|---|---|---|"]
    lines += [f"| {s} | {t} | {'done in an earlier run' if summary['stages'][s].get('skipped') else ''} |"
              for s, t in times.items()]
    total = sum(t for s, t in times.items() if isinstance(t, (int, float)) and not summary["stages"][s].get("skipped"))
    lines += [f"| total (this run) | {total:.0f} | |", ""]
    table = config.output_path / "eval" / "results.md"
    if table.exists():
        lines += ["## Eval, checkpoint by checkpoint", "", table.read_text().strip(), ""]
    return "\n".join(lines)


def print_report(summary: dict, config: Config) -> None:
    print("\n=== raylm run: report ===")
    if summary.get("gains"):
        from raylm.eval.gains import from_dict

        print("  each stage against the one before it, on held-out items (95% interval):")
        for g in summary["gains"]:
            print(f"    {from_dict(g).line()}")
        print()
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
    results = config.output_path / "results.md"
    results.write_text(report_text(summary, config))
    print(f"  results: {results}")
    print(f"  artifacts: {config.output_path.resolve()}")
    print(f"  MLflow: {summary['tracking_uri']} (parent run {summary['mlflow_parent_run']})")
    if summary.get("registered_model"):
        print(f"  registered model: {summary['registered_model']}")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open it with: mlflow ui --backend-store-uri {summary['tracking_uri']}")
