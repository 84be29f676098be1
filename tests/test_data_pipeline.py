"""`raylm data` end to end through the CLI, on real Ray: part of the embedded corpus plus a file of
bad input and a gzip copy, checked for what comes out (quarantine, stats, shards, tokenizer, MLflow),
and a run killed mid-way then restarted must end with the same bytes as an uninterrupted run."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylm.data.stdlib_corpus import build_embedded_corpus
from raylm.data.token_shards import PackedTokenDataset, read_index

pytestmark = pytest.mark.timeout(600)

RAYLM = [str(Path(sys.executable).parent / "raylm")]
BAD_LINES = [
    b'{"text": "an unterminated record',  # malformed JSON
    b'{"text": "caf\xe9 au lait"}',  # invalid UTF-8
    b'{"id": "no-text"}',  # missing text
    b'{"text": 42}',  # non-string text
    b'{"text": "   "}',  # empty text
    json.dumps({"text": "word " * 50_000}).encode(),  # over max_chars
]


def write_config(tmp_path: Path, inputs: list[str], out: Path) -> Path:
    config = yaml.safe_load((Path(__file__).parents[1] / "examples/laptop/data.yaml").read_text())
    config.update(output_dir=str(out), inputs=[{"path": p} for p in inputs])
    config["tokenizer"]["vocab_size"] = 512
    config["compute"].update(max_chars=200_000, batch_size=128)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def raylm_data(config: Path, tracking: str, **popen):
    return subprocess.Popen(RAYLM + ["data", str(config), "--tracking-uri", tracking], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    corpus = build_embedded_corpus(root / "corpus", max_documents=400)
    lines = corpus.read_bytes().splitlines()
    (root / "corpus.jsonl").write_bytes(b"\n".join(lines[:300]) + b"\n")
    with gzip.open(root / "more.jsonl.gz", "wb") as f:  # 100 more documents, 20 of them repeated
        f.write(b"\n".join(lines[300:] + lines[:20]) + b"\n")
    (root / "bad.jsonl").write_bytes(b"\n".join(lines[:3] + BAD_LINES) + b"\n")
    return root, len(lines) + 20 + 3


@pytest.fixture(scope="module")
def reference_run(inputs, tmp_path_factory):
    root, n_valid = inputs
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "reference"
    config = write_config(tmp, [str(root / "corpus.jsonl"), str(root / "more.jsonl.gz"), str(root / "bad.jsonl")], out)
    tracking = f"sqlite:///{tmp}/mlflow.db"
    proc = raylm_data(config, tracking)
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-5000:]
    return out, config, tracking, n_valid


def test_pipeline_outputs_quarantine_stats_shards_and_tracking(reference_run, inputs):
    out, config, tracking, n_valid = reference_run
    inputs_root = inputs[0]
    stats = json.loads((out / "stats.json").read_text())
    docs = stats["documents"]
    # nothing valid lost: every valid record is either kept or dropped by a named filter
    assert docs["documents_in"] == n_valid + len(BAD_LINES)
    assert docs["bad_input"] == {"malformed_json": 1, "invalid_utf8": 1, "missing_text": 1, "non_string_text": 1,
                                 "empty_text": 1, "huge_document": 1}
    dropped = sum(f["total"] for f in docs["dropped_by_filter"].values())
    assert docs["documents_out"] + dropped + docs["quarantined"] == docs["documents_in"]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantine) == sorted(docs["bad_input"])
    assert all(q["file"].endswith("bad.jsonl") and q["line"] >= 4 for q in quarantine)
    # the repeated documents are exact duplicates across files: each one the filters keep is removed
    from raylm.actors.data.quality_filters import DocumentFilter, FilterConfig

    document_filter = DocumentFilter(FilterConfig(**yaml.safe_load(config.read_text())["filters"]))
    repeated = [json.loads(line)["text"] for line in (inputs_root / "corpus.jsonl").read_text().splitlines()[:20]]
    kept_repeats = sum(not document_filter.filter_one(text)[1] for text in repeated)
    assert kept_repeats >= 5 and stats["dedup"]["exact_duplicates_removed"] >= kept_repeats
    tokens = stats["tokens"]
    kept = docs["documents_out"] - stats["dedup"]["exact_duplicates_removed"] - stats["dedup"]["near_duplicates_removed"]
    # every kept document is in the shards once (source weights repeat or sample training ones apart)
    assert tokens["validation"]["documents"] > 0
    assert tokens["train"]["documents"] + tokens["validation"]["documents"] + tokens["documents_weighted_out"] == kept
    index = read_index(out / "tokens")
    assert (out / "tokens/tokenizer.json").exists()
    assert index["dtype"] == "uint16" and index["vocab_size"] == 512 and index["eos_token_id"] == 2
    assert sum(s["tokens"] for s in index["splits"]["train"]) == tokens["train"]["tokens"]
    # the shards decode, with the trained tokenizer in transformers, to the filtered text
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    sample = next(iter(PackedTokenDataset(out / "tokens", seq_len=64, seed=0)))
    text = tokenizer.decode(sample["tokens"].tolist())
    assert len(text) > 50 and "\ufffd" not in text  # 64 tokens of a 512-token vocabulary
    # MLflow got the metrics and the stats artifact
    import mlflow

    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("data"))
    assert run.data.metrics["quarantined"] == 6
    assert run.data.metrics["train_tokens"] == tokens["train"]["tokens"]
    assert "stats.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_run_restarts_to_identical_output(reference_run, tmp_path):
    reference, reference_config, _, _ = reference_run
    config = yaml.safe_load(reference_config.read_text())
    out = tmp_path / "resumed"
    config["output_dir"] = str(out)
    path = tmp_path / "resumed.yaml"
    path.write_text(yaml.safe_dump(config))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    proc = raylm_data(path, tracking)
    deadline = time.time() + 400
    while not (out / "dedup.done.json").exists():  # killed between phases' work, mid-run
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tokens" / "index.json").exists()
    proc = raylm_data(path, tracking)
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-5000:]
    for folder in ("tokens",):
        assert files_of(out / folder) == files_of(reference / folder)
    for name in ("quarantine.jsonl", "tokenizer.json", "removed_keys.npy"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    stats, ref_stats = (json.loads((d / "stats.json").read_text()) for d in (out, reference))
    assert set(stats["reused"]) == {"documents", "dedup"} and ref_stats["reused"] == {}
    same = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "reused")}  # noqa: E731
    assert same(stats) == same(ref_stats)


@pytest.mark.slow
def test_streams_through_an_object_store_budget_smaller_than_the_corpus(reference_run, inputs, tmp_path):
    """Ray Data may hold 64 KiB at once, a fraction of the corpus: the stages back-pressure and
    stream, and the output is byte for byte the unlimited run's."""
    root, _ = inputs
    reference, reference_config, _, _ = reference_run
    corpus_bytes = sum(p.stat().st_size for p in root.iterdir())
    budget = 64 << 10
    assert corpus_bytes > 3 * budget, corpus_bytes
    config = yaml.safe_load(reference_config.read_text())
    out = tmp_path / "budget"
    config["output_dir"] = str(out)
    config["compute"]["object_store_budget"] = budget
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = raylm_data(path, f"sqlite:///{tmp_path}/mlflow.db")
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-5000:]
    assert files_of(out / "tokens") == files_of(reference / "tokens")
    for name in ("quarantine.jsonl", "tokenizer.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
