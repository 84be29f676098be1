"""Stage runs in a real MLflow tracking server, read back through the MLflow client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raylm.config import ModelStageConfig
from raylm.tracking import Progress, default_tracking_uri, stage_run

REPO = Path(__file__).resolve().parents[1]


def raylm(*args, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pipeline_is_a_parent_run_with_nested_stage_runs(tmp_path, mlflow_server):
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\ntracking:\n  experiment: lifecycle-test\nstages: [export]\n"
        "sections:\n  export:\n    verify_vllm: false\n    model:\n      preset: debug\n      dim: 64\n      n_heads: 2\n"
    )
    raylm("run", str(config), "--tracking-uri", mlflow_server, cwd=tmp_path)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("lifecycle-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "lifecycle")
    child = next(r for r in runs if r.info.run_name == "export")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == child.info.status == "FINISHED"
    # params = the resolved config, defaults included
    assert child.data.params["model.dim"] == "64"
    assert child.data.params["model.n_layers"] == "2"
    assert child.data.params["output_dir"] == str(tmp_path / "out" / "export")
    assert child.data.metrics["transformers_logits_max_abs_diff"] < 1e-4
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    checkpoint = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
    assert {"checkpoint/config.json", "checkpoint/model.safetensors"} <= checkpoint
    local = client.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path))
    assert "dim: 64" in Path(local).read_text()

    # The parent run holds the lifecycle's config and each stage's headline results.
    assert parent.data.params["stages"] == '["export"]' and parent.data.params["output_dir"] == str(tmp_path / "out")
    assert parent.data.metrics["export/transformers_logits_max_abs_diff"] == \
        child.data.metrics["transformers_logits_max_abs_diff"]
    assert parent.data.tags["raylm.run.export"] == child.info.run_id
    # The experiment opens on training runs, not in GenAI mode.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The stage's model and the lifecycle's final model are in the Model Registry, with lineage.
    [stage_version] = client.search_model_versions("name='lifecycle-test-export'")
    assert stage_version.run_id == child.info.run_id and stage_version.source.endswith("/checkpoint")
    assert stage_version.tags["raylm.lifecycle_run"] == parent.info.run_id
    [final] = client.search_model_versions("name='lifecycle-test'")
    assert final.run_id == child.info.run_id and final.tags["raylm.run.export"] == child.info.run_id
    assert parent.data.tags["raylm.registered_model"] == f"lifecycle-test/{final.version}"
    # A registered version's files are the model: read back through the registry.
    files = {Path(p).name for p in Path(client.download_artifacts(final.run_id, "checkpoint", str(tmp_path / "dl"))).iterdir()}
    assert {"config.json", "model.safetensors"} <= files


def test_lineage_tags_name_the_starting_checkpoint_and_the_data(tmp_path):
    from raylm.config import load_config
    from raylm.pipelines import sft
    from raylm.tracking import lineage_tags

    config = load_config(sft.Config, None, [f"checkpoint={tmp_path / 'pretrain' / 'hf'}", "data.builtin=stdlib-instructions"])
    assert lineage_tags(config) == {"raylm.parent_checkpoint": str(tmp_path / "pretrain" / "hf"),
                                    "raylm.data": "builtin:stdlib-instructions"}
    config = load_config(sft.Config, None, ["data.train=a.jsonl", "data.validation=b.jsonl"])
    assert lineage_tags(config)["raylm.data"] == f"{Path('a.jsonl').resolve()}, {Path('b.jsonl').resolve()}"
    # rlhf's data section names a prompts file, not train/validation files
    from raylm.pipelines import rlhf

    config = load_config(rlhf.Config, None, [f"policy.checkpoint={tmp_path / 'sft'}"])
    assert lineage_tags(config)["raylm.data"] == "builtin:stdlib"
    config = load_config(rlhf.Config, None, [f"policy.checkpoint={tmp_path / 'sft'}", "data.builtin=null",
                                             "data.prompts=p.jsonl"])
    assert lineage_tags(config)["raylm.data"] == str(Path("p.jsonl").resolve())


def test_default_store_is_sqlite_in_the_output_dir(tmp_path):
    config = ModelStageConfig(output_dir=str(tmp_path / "out"))
    with stage_run("unit", config) as run:
        assert run.uri == default_tracking_uri(tmp_path / "out")
        for step in range(3):
            run.log_metrics({"loss": 3.0 - step}, step=step)
    assert (tmp_path / "out" / "mlflow.db").exists()
    client = MlflowClient(run.uri)
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_failed_stage_run_is_marked_failed_with_its_traceback(tmp_path):
    config = ModelStageConfig(output_dir=str(tmp_path / "out"))
    with pytest.raises(RuntimeError):
        with stage_run("unit", config) as run:
            raise RuntimeError("boom")
    client = MlflowClient(run.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    error = client.download_artifacts(run.run_id, "error.txt", str(tmp_path))
    assert "RuntimeError: boom" in Path(error).read_text()


def test_progress_prints_step_loss_throughput_and_eta(capsys):
    progress = Progress(total_steps=10, name="pretrain", every=5)
    for step in range(1, 11):
        progress.update(step, tokens=1000, loss=2.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[pretrain] step 5/10 loss 2.5 tok/s ") and " eta " in lines[0]


def test_parent_run_metrics_are_each_stages_numbers():
    from raylm.pipelines.lifecycle import headline_metrics

    metrics = headline_metrics("eval", {
        "mlflow_run": "abc", "seconds": 3.5, "skipped": True, "ok": True, "checkpoint": "out/x",
        "results": {"sft": {"stdlib_mc (0-shot)": {"acc": 0.5, "acc_stderr": 0.1}}},
        "preference": {"win_rate": 0.6, "model_a": "sft"}})
    assert metrics == {"eval/seconds": 3.5, "eval/results/sft/stdlib_mc _0-shot_/acc": 0.5,
                       "eval/results/sft/stdlib_mc _0-shot_/acc_stderr": 0.1, "eval/preference/win_rate": 0.6}
