"""raylm on a real multi-node Ray cluster on this machine, and the cluster configs of cluster/.

A Ray head is started with `ray start --head` on 127.0.0.1 (it coordinates only) and a second node
carrying the `train_node` resource joins it. `raylm submit` sends a small lifecycle (pretrain ->
export) there through Ray's job API; its MLflow runs land in a real tracking server. Mid-training the
second node is killed (raylet and workers, as when a machine dies) and a replacement node joins, as
the autoscaler would start one: Ray Train must resume from the last checkpoint and finish.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- the cluster configs pass Ray's own validation ---------------------------------------------


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert types["cpu_worker"]["resources"]["data_node"] == 1
    assert types["gpu_worker"]["resources"]["train_node"] == 1
    # the dashboard is never opened beyond the head's loopback
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    # and the validation can fail: a misspelt key is refused
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(raw))


def test_kuberay_manifests_translate_into_a_valid_autoscaling_config():
    """Ray's own KubeRay translation (what its autoscaler runs in the head pod) reads the RayCluster
    into an autoscaling config and validates it; the RayJob targets that cluster."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    types = config["available_node_types"]
    assert types["cpu-workers"]["resources"]["data_node"] == 1
    assert types["gpu-workers"]["resources"]["GPU"] == 8 and types["gpu-workers"]["resources"]["train_node"] == 1
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "raylm run examples/cluster.yaml" in job["spec"]["entrypoint"]
    for doc in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "mlflow.yaml").read_text()):
        if doc["kind"] == "Service":
            assert doc["spec"]["type"] == "ClusterIP"


def test_cluster_example_is_a_valid_lifecycle_config():
    from raylm.config import load_config
    from raylm.pipelines import lifecycle

    config = load_config(lifecycle.Config, ROOT / "examples" / "cluster.yaml")
    for stage in config.stages:
        lifecycle.stage_config(config, stage, "examples/cluster.yaml")


def test_submit_validates_the_config_before_anything_is_sent(tmp_path, capsys):
    from raylm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [pretrain]\nsections:\n  pretrain:\n    train:\n      stepz: 3\n")
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:9", "--set", f"submit.working_dir={tmp_path}"]) == 2
    assert "sections.pretrain" in capsys.readouterr().err
    outside = tmp_path / "outside.yaml"
    outside.write_text("stages: [export]\n")
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:9", "--set",
                 f"submit.working_dir={ROOT / 'examples'}"]) == 2
    assert "inside submit.working_dir" in capsys.readouterr().err


# --- a real two-node cluster -------------------------------------------------------------------


class LocalCluster:
    """Ray nodes started with `ray start` on 127.0.0.1 with token authentication, each in a temp dir
    of its own (as on separate machines; nothing else's Ray on this machine is touched)."""

    def __init__(self):
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="rlc"))  # short: Ray's socket paths live under it
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # as from an activated virtual environment: the job's `raylm` is the installed one
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @staticmethod
    def node_ports() -> list[str]:
        """Ports of one node's agents, free ones: several nodes share this machine."""
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def ray(self, *args: str) -> None:
        subprocess.run([str(BIN / "ray"), *args], env=self.env, check=True, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_head(self) -> None:
        self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", "--num-cpus=1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 f"--temp-dir={self.root / 'head'}", *self.node_ports())

    def add_node(self, name: str, resources: str, num_cpus: int = 2) -> None:
        self.ray("start", f"--address=127.0.0.1:{self.port}", "--node-ip-address=127.0.0.1",
                 f"--num-cpus={num_cpus}", "--resources", resources, f"--temp-dir={self.root / name}",
                 *self.node_ports())

    def state(self, resource: str, **filters) -> list[dict]:
        """Rows of Ray's state API (``nodes``, ``actors``) from the dashboard."""
        import json
        import urllib.parse
        import urllib.request

        query = {"detail": "1", "limit": "1000"}
        for key, value in filters.items():
            query.update(filter_keys=key, filter_predicates="=", filter_values=value)
        request = urllib.request.Request(f"{self.address}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def processes(self, under: Path):
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(str(under) in part for part in proc.info["cmdline"] or ()):
                yield proc

    def kill(self, under: Path) -> int:
        """SIGKILL every process of the nodes whose temp dir is under ``under``, and their children."""
        import psutil

        killed = 0
        for proc in list(self.processes(under)):
            try:
                family = [*proc.children(recursive=True), proc]
            except psutil.NoSuchProcess:
                continue
            for p in family:
                try:
                    p.kill()
                    killed += 1
                except psutil.NoSuchProcess:
                    pass
        return killed

    def kill_node(self, name: str) -> int:
        """The node dies as a machine does: its raylet, agents and workers at once."""
        return self.kill(self.root / name)

    def shutdown(self) -> None:
        import shutil

        self.kill(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster()
    try:
        c.start_head()
        c.add_node("node1", '{"train_node": 1}')
        yield c
    finally:
        c.shutdown()


def pretrain_history(client, parent_id: str, key: str):
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`raylm.stage` = 'pretrain'")
    if not runs:
        return []
    return client.get_metric_history(runs[0].info.run_id, key)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_runs_on_the_cluster_where_resources_say_and_survives_a_dead_node(cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from test_train_pretrain import VOCAB, build_shards

    data_dir = build_shards(tmp_path / "shards", n_documents=400)
    workdir = tmp_path / "job"
    workdir.mkdir()
    steps, every = 60, 10
    config = {
        "output_dir": str(tmp_path / "out"),
        "stages": ["pretrain", "export"],
        "tracking": {"experiment": "cluster-test"},
        "sections": {
            "pretrain": {
                "data_dir": str(data_dir),
                "model": {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 128},
                "train": {"steps": steps, "batch_size": 8, "seq_len": 128, "log_every": 1, "eval_every": 0,
                          "checkpoint_every": every, "max_failures": 2, "deterministic": True},
                "optim": {"warmup_steps": 2},
                "parallel": {"num_workers": 2, "resources_per_worker": {"train_node": 0.5}},
            },
            "export": {"verify_vllm": False},
        },
        "submit": {"poll_seconds": 0.5},
    }
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump(config))

    submitted = subprocess.run(
        [str(BIN / "raylm"), "submit", "pipeline.yaml", "--address", cluster.address, "--tracking-uri", mlflow_server,
         "--no-follow"], cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"job (\S+) submitted", submitted.stdout).group(1)
    jobs = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})

    client = MlflowClient(mlflow_server)
    checkpoints = tmp_path / "out" / "pretrain" / "ray_train" / "pretrain"
    deadline = time.time() + 300
    # Kill the node once Ray Train has registered a checkpoint (its manager's snapshot lists it; a
    # checkpoint folder on disk alone is not yet one a restart resumes from), with most of the run
    # still ahead.
    snapshot = checkpoints / "checkpoint_manager_snapshot.json"

    def registered_checkpoints() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
            return 0

    while registered_checkpoints() < 1:
        status = str(jobs.get_job_status(job_id).value)
        assert status not in ("FAILED", "STOPPED", "SUCCEEDED"), jobs.get_job_logs(job_id)[-5000:]
        assert time.time() < deadline, "no checkpoint in time:\n" + jobs.get_job_logs(job_id)[-5000:]
        time.sleep(0.05)

    assert cluster.kill_node("node1") > 0
    cluster.add_node("node2", '{"train_node": 1}')  # the replacement, as the autoscaler would start one

    deadline = time.time() + 480
    while (status := str(jobs.get_job_status(job_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, "the job did not finish in time:\n" + jobs.get_job_logs(job_id)[-5000:]
        time.sleep(1)
    logs = jobs.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-8000:]

    # MLflow: the parent run with its nested stage runs, all finished, in the real server.
    experiment = client.get_experiment_by_name("cluster-test")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`raylm.stage` = 'lifecycle'")[0].info.run_id
    stages = {r.data.tags["raylm.stage"]: r for r in client.search_runs(
        [client.get_experiment_by_name("cluster-test").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(stages) == {"pretrain", "export"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    # the loss curves, drawn from those runs, are the parent run's artifacts
    assert "plots/pretrain.png" in {a.path for a in client.list_artifacts(parent, "plots")}
    # Resumed from the last checkpoint: the steps after it were trained twice, none before it.
    history = pretrain_history(client, parent, "loss")
    counts: dict[int, int] = {}
    for m in history:
        counts[m.step] = counts.get(m.step, 0) + 1
    assert max(counts) == steps
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+) \(checkpoint ", logs)]
    assert resumed and resumed[0] >= every and resumed[0] % every == 0, logs[-8000:]
    # the work lost is at most the steps since that checkpoint: only those were trained twice
    replayed = sorted(step for step, n in counts.items() if n > 1)
    assert all(resumed[0] < step for step in replayed), (resumed, replayed)

    # Placement: every training worker ran on a node that carries `train_node`, none on the head
    # (Ray's state API, read over the dashboard's HTTP with the cluster's token).
    nodes = {n["node_id"]: n["resources_total"] for n in cluster.state("nodes")}
    workers = cluster.state("actors", class_name="RayTrainWorker")
    assert len(workers) >= 4  # two before the node died, two after
    assert all("train_node" in nodes[w["node_id"]] for w in workers), (workers, nodes)
