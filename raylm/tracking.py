"""MLflow tracking: every stage run is an MLflow run, a pipeline a parent run with nested stage runs.

``StageRun`` is a small picklable handle (tracking URI + run id): the driver creates it, and Ray
actors and Ray Train workers that receive it log metrics to the same run through ``MlflowClient``,
with no process-global MLflow state involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from raylm.config import StageConfig, flatten, resolved_dict

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
PARAM_BATCH = 100  # MLflow's limit on params per log_batch call


def default_tracking_uri(output_dir: str | Path) -> str:
    """A SQLite store in the output directory (MLflow 3.13+ refuses the old ./mlruns file store)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(config: StageConfig, override: str | None = None) -> str:
    return (override or config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or default_tracking_uri(config.output_dir))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment of unknown kind as a GenAI experiment (traces, prompts): raylm's
# are model training, shown as runs with metrics, params and artifacts.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Top-level artifact folders in which a stage's run holds a Hugging Face model.
MODEL_ARTIFACTS = ("model", "checkpoint")


def experiment_id(uri: str, name: str, output_dir: str | Path) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            # A local store keeps artifacts beside it, not in the current directory.
            artifact_location = (Path(output_dir).resolve() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:  # an experiment created before, or by another tool
            with contextlib.suppress(Exception):
                client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@dataclass
class StageRun:
    """A handle on one MLflow run; cheap to pickle into Ray tasks and actors."""

    uri: str
    run_id: str
    experiment_id: str

    @property
    def client(self):
        return _client(self.uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + PARAM_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def download_artifacts(self, artifact_path: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def model_artifact(self) -> str | None:
        """The artifact folder holding this run's model (``model`` or ``checkpoint``), if any."""
        folders = {a.path for a in self.client.list_artifacts(self.run_id) if a.is_dir}
        return next((name for name in MODEL_ARTIFACTS if name in folders), None)

    def register_model(self, name: str, tags: dict | None = None, artifact: str | None = None):
        """Register this run's model folder as a new version of ``name`` in the Model Registry, with
        ``tags`` (lineage) on the version; None when the run logged no model."""
        artifact = artifact or self.model_artifact()
        if artifact is None:
            return None
        client = self.client
        with contextlib.suppress(Exception):  # exists already
            client.create_registered_model(name, description="raylm: a Hugging Face causal-LM folder "
                                           "(config.json, model.safetensors, tokenizer.json)")
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        return client.create_model_version(name, f"runs:/{self.run_id}/{artifact}", run_id=self.run_id, tags=tags)


def _param_value(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def start_run(uri: str, experiment: str, run_name: str, output_dir, parent: StageRun | None = None, tags=None) -> StageRun:
    exp_id = parent.experiment_id if parent is not None else experiment_id(uri, experiment, output_dir)
    all_tags = {"raylm.stage": run_name, **(tags or {})}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    run = _client(uri).create_run(exp_id, run_name=run_name, tags=all_tags)
    return StageRun(uri, run.info.run_id, exp_id)


def lineage_tags(config: StageConfig) -> dict[str, str]:
    """What a stage's model was made from, as far as its config says: the checkpoint it started
    from, its data (token shards, JSONL files or a built-in set)."""
    tags = {}
    for key, value in (("parent_checkpoint", getattr(config, "checkpoint", None)),
                       ("parent_checkpoint", getattr(getattr(config, "policy", None), "checkpoint", None)),
                       ("reward_checkpoint", getattr(getattr(config, "reward", None), "checkpoint", None)),
                       ("data", getattr(config, "data_dir", None))):
        if isinstance(value, str) and value:
            tags[f"raylm.{key}"] = str(Path(value).resolve()) if "://" not in value else value
    data = getattr(config, "data", None)
    if data is not None and hasattr(data, "builtin"):
        # sft/reward/dpo read train/validation files, rlhf a prompts file
        files = [str(Path(f).resolve()) for name in ("train", "validation", "prompts")
                 if isinstance(f := getattr(data, name, None), str) and f]
        tags["raylm.data"] = ", ".join(files) if files else f"builtin:{data.builtin}"
    return tags


def register_stage_model(run: StageRun, stage: str, config: StageConfig, extra_tags: dict | None = None):
    """Register a finished stage's model as ``<experiment>-<stage>`` with its lineage."""
    if not config.tracking.registry:
        return None
    tags = {"raylm.stage": stage, "raylm.run": run.run_id, **lineage_tags(config), **(extra_tags or {})}
    return run.register_model(f"{config.tracking.experiment}-{stage}", tags)


@contextlib.contextmanager
def stage_run(stage: str, config: StageConfig, parent: StageRun | None = None, uri: str | None = None,
              lineage: dict | None = None):
    """Open the MLflow run of one stage: params = the resolved config, which is also logged as
    ``config.yaml``; the run ends FINISHED, or FAILED with the traceback logged, or KILLED on Ctrl-C.
    What Ray's workers (Ray Train, vLLM, Ray Data) print meanwhile goes to ``<output_dir>/logs/ray.log``,
    logged to the run as ``logs/ray.log`` (``raylm.console``)."""
    from raylm.console import CONSOLE

    uri = parent.uri if parent is not None and uri is None else resolve_tracking_uri(config, uri)
    resolved = resolved_dict(config)
    run = start_run(uri, config.tracking.experiment, stage, config.output_dir, parent)
    run.log_params(flatten(resolved))
    run.log_text(yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    status = "FINISHED"
    outer_log, log_path = CONSOLE.log_path, stage_log_path(config)
    CONSOLE.log_to(log_path)
    try:
        yield run
        # The stage's model in the Model Registry, with what it was made from (``lineage`` adds what
        # only the lifecycle knows: the runs that made its inputs).
        try:
            version = register_stage_model(run, stage, config, lineage)
        except Exception as e:  # the stage's work is done and logged: say so, do not fail it
            print(f"raylm {stage}: the model was not registered in MLflow's Model Registry ({e})", flush=True)
        else:
            if version is not None:
                run.set_tags({"raylm.registered_model": f"{version.name}/{version.version}"})
                print(f"raylm {stage}: registered model {version.name} version {version.version}", flush=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        with contextlib.suppress(Exception):
            run.log_text(traceback.format_exc(), "error.txt")
        if not CONSOLE.verbose:
            print(f"raylm {stage}: failed; Ray's and the workers' output is in {log_path}", file=sys.stderr, flush=True)
        raise
    finally:
        CONSOLE.log_to(outer_log)
        if log_path.exists():
            with contextlib.suppress(Exception):
                run.log_artifact(log_path, "logs")
        with contextlib.suppress(Exception):
            run.client.set_terminated(run.run_id, status)


def stage_log_path(config: StageConfig) -> Path:
    """Where a stage's Ray, Ray Train and vLLM output goes (the console shows raylm's lines only)."""
    return Path(config.output_dir) / "logs" / "ray.log"


class Progress:
    """One console line every ``every`` steps: step, loss and other values, tokens/s, ETA."""

    def __init__(self, total_steps: int, name: str = "", every: int = 1, stream=None):
        self.total, self.name, self.every = total_steps, name, max(1, every)
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, tokens: int = 0, **values) -> dict:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        eta = elapsed / max(step, 1) * max(self.total - step, 0)
        if step % self.every == 0 or step == self.total:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            tok = f" tok/s {rate:,.0f}" if self.tokens else ""
            line = f"[{self.name}] step {step}/{self.total} {shown}{tok} eta {_duration(eta)}"
            if self.stream is sys.stdout:  # a bar redrawn in place on a terminal, a line in a pipe
                from raylm.console import CONSOLE

                CONSOLE.show(line)
            else:
                print(line, file=self.stream, flush=True)
        return {"tokens_per_s": rate, "elapsed_s": elapsed}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"

