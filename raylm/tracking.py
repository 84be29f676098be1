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


def experiment_id(uri: str, name: str, output_dir: str | Path) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        # A local store keeps artifacts beside it, not in the current directory.
        artifact_location = (Path(output_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
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


@contextlib.contextmanager
def stage_run(stage: str, config: StageConfig, parent: StageRun | None = None, uri: str | None = None):
    """Open the MLflow run of one stage: params = the resolved config, which is also logged as
    ``config.yaml``; the run ends FINISHED, or FAILED with the traceback logged, or KILLED on Ctrl-C."""
    uri = parent.uri if parent is not None and uri is None else resolve_tracking_uri(config, uri)
    resolved = resolved_dict(config)
    run = start_run(uri, config.tracking.experiment, stage, config.output_dir, parent)
    run.log_params(flatten(resolved))
    run.log_text(yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        with contextlib.suppress(Exception):
            run.log_text(traceback.format_exc(), "error.txt")
        raise
    finally:
        with contextlib.suppress(Exception):
            run.client.set_terminated(run.run_id, status)


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
            print(f"[{self.name}] step {step}/{self.total} {shown}{tok} eta {_duration(eta)}", file=self.stream, flush=True)
        return {"tokens_per_s": rate, "elapsed_s": elapsed}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"

