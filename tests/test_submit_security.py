"""What `raylm submit` sends and says, and the cluster manifests' exposure: secrets never leave the
laptop, .gitignore'd files neither, the user is told the job API has no authentication, job
commands need only a job id, and the KubeRay manifests pin their image and fence the head and MLflow."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from raylm.cli import main
from raylm.config import load_config
from raylm.pipelines import submit

ROOT = Path(__file__).resolve().parents[1]


def uploaded_files(tmp_path, working_dir: Path, extra_excludes=()) -> set[str]:
    """The files of the zip Ray itself builds from the job's runtime_env (its own .gitignore
    handling off, so the test sees what raylm's excludes alone leave out)."""
    from ray._private.runtime_env.packaging import _zip_files

    config_path = working_dir / "job.yaml"
    config = load_config(submit.Config, config_path, [f"submit.working_dir={working_dir}"] +
                         [f"submit.excludes={list(extra_excludes)}"])
    env = submit.runtime_env(config, None)
    out = tmp_path / "package.zip"
    _zip_files(env["working_dir"], env["excludes"], str(out), include_gitignore=False)
    with zipfile.ZipFile(out) as z:
        return {name for name in z.namelist() if not name.endswith("/")}


def test_secrets_vcs_and_gitignored_files_are_not_uploaded(tmp_path):
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "job.yaml").write_text("stages: [export]\n")
    (work / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (work / "notes.md").write_text("keep me\n")
    secrets = [".env", ".env.production", "server.pem", "tls/private.key", "config/credentials.json",
               ".aws/credentials", ".ssh/id_ed25519", "deploy/id_rsa", ".netrc", ".git/config",
               ".git-credentials", "gcp-service-account.json", "nested/.env"]
    ignored = ["scratch/big.bin", "results.tmp"]
    for name in secrets + ignored:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("secret\n")
    (work / ".gitignore").write_text("# local junk\nscratch/\n*.tmp\n")
    files = uploaded_files(tmp_path, work)
    assert {"job.yaml", "data/train.jsonl", "notes.md", ".gitignore"} <= files
    leaked = [name for name in secrets + ignored if name in files]
    assert not leaked, f"uploaded: {leaked}"
    # and the user's own excludes on top
    assert "notes.md" not in uploaded_files(tmp_path, work, ["notes.md"])


def test_submit_says_the_job_api_has_no_authentication(tmp_path, capsys):
    """Printed before anything is sent; here the address answers nothing, so the submission fails
    after the note (exit non-zero, no job)."""
    config = tmp_path / "job.yaml"
    config.write_text("stages: [export]\nsubmit:\n  poll_seconds: 0.1\n")
    with pytest.raises(Exception):
        main(["submit", str(config), "--address", "http://127.0.0.1:9", "--set", f"submit.working_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "no authentication" in err and "tunnel" in err and "http://127.0.0.1:9" in err


def test_job_commands_take_a_job_id_alone(capsys):
    """No config is read or validated: the id and the address are all --status needs (here the
    address answers nothing, so the client's connection error is what fails)."""
    with pytest.raises(Exception) as err:
        main(["submit", "--address", "http://127.0.0.1:9", "--status", "raylm-run-1"])
    assert "config" not in str(err.value).lower()
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "a config file is required" in capsys.readouterr().err


def kuberay_docs() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_kuberay_images_are_pinned_by_version():
    found = [image for doc in kuberay_docs() for image in images(doc)]
    assert found
    for image in found:
        assert ":" in image and not image.endswith(":latest"), image
    assert len(set(found)) == 1  # every pod runs the same build


def test_network_policies_fence_the_head_and_mlflow():
    docs = kuberay_docs()
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "raylm-mlflow")
    job = next(d for d in docs if d["kind"] == "RayJob")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    head_labels = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head = next(p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"] == head_labels)
    store = next(p for p in policies.values()
                 if p["spec"]["podSelector"]["matchLabels"].items() <= mlflow["spec"]["template"]["metadata"]["labels"].items())
    for policy in (head, store):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert sources and all("ipBlock" not in peer for peer in sources)  # no address range, pods only
        assert {"podSelector": {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}} in sources
    # the RayJob's submitter carries a label the head's policy lets in
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    head_sources = [peer["podSelector"]["matchLabels"] for rule in head["spec"]["ingress"] for peer in rule["from"]
                    if "namespaceSelector" not in peer]
    assert any(labels.items() <= submitter.items() for labels in head_sources)
