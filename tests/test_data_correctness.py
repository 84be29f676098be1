"""`raylm data` output against its own decisions, end to end through the CLI on real Ray: the shards
hold exactly the kept documents (no duplicate, no filtered or quarantined record), whole bad files
(corrupt .gz and .zst, a parquet that is not parquet) are quarantined by name while every other
file's records go on, the counts add up and agree with stats.json, quarantine.jsonl stays valid
JSONL with U+2028 / U+0085 / NUL in bad records, and a rerun says which phases it reused."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raylm.actors.data.connected_components import components_in_process
from raylm.actors.data.document_reader import RECORD_BITS, read_file_records
from raylm.actors.data.minhash_dedup import DedupConfig, MinHashSignatures, bucket_edges
from raylm.actors.data.quality_filters import DocumentFilter, FilterConfig
from raylm.data.stdlib_corpus import build_embedded_corpus
from raylm.data.token_shards import read_index

pytestmark = pytest.mark.timeout(900)

RAYLM = [str(Path(sys.executable).parent / "raylm")]
BAD_RECORDS = [  # raw bytes of records that must be quarantined, each with what quarantine.jsonl keeps
    '{"id": "sep", "text": "an unterminated record with a line separator \u2028 and a next-line \u0085 in it',
    '{"id": 31, "source": "forum", "text": 31}',
    '{"id": "nul", "text": "a raw NUL \x00 breaks JSON"}',
    '{"id": "u2028", "text": ["not", "a", "string", "\u2028"]}',
]


def edit_words(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
        words[i] = words[i][::-1]
    return " ".join(words)


def distinct_originals(tmp_path: Path, docs: list[dict], filtered: list[str], n: int) -> list[dict]:
    """``n`` documents of the embedded corpus that are nobody's duplicate once filtered (the corpus's
    own real duplicates removed first), so every planted copy has exactly one earlier twin."""
    cfg = DedupConfig(bucket_shards=2)
    table = MinHashSignatures(cfg)(pa.table({"key": pa.array(range(len(docs)), pa.int64()),
                                             "text": filtered, "reason": [""] * len(docs)}))
    pq.write_table(table, tmp_path / "sig.parquet")
    removed, _ = components_in_process([bucket_edges([str(tmp_path / "sig.parquet")], s, cfg) for s in range(2)], 2)
    linked = set(removed.tolist())
    for shard in range(2):  # also drop the kept member of each real cluster: a planted copy of it
        for links in bucket_edges([str(tmp_path / "sig.parquet")], shard, cfg).values():
            linked.update(links[:, 0].tolist())
    return [d for i, d in enumerate(docs) if i not in linked][:n]


def gz_with_corruption(records: list[bytes], path: Path, keep_fraction: float) -> int:
    """A .gz whose bytes after ``keep_fraction`` are garbage; returns the records readable before it."""
    data = gzip.compress(b"\n".join(records) + b"\n")
    cut = int(len(data) * keep_fraction)
    path.write_bytes(data[:cut] + bytes(range(256)) * 8 + data[cut + 2048:])
    readable = 0
    try:
        for _ in read_file_records(str(path), 0, "x", "auto", 10**6):
            readable += 1
    except OSError:
        pass
    return readable


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("correctness")
    docs = [json.loads(line) for line in build_embedded_corpus(root / "embedded").read_text().splitlines()]
    laptop = yaml.safe_load((Path(__file__).parents[1] / "examples/laptop/data.yaml").read_text())
    document_filter = DocumentFilter(FilterConfig(**laptop["filters"]))
    # documents the filters keep, so that each planted copy is a duplicate to remove, not a drop
    docs = [d for d in docs if 120 <= len(d["text"].split()) <= 600 and not document_filter.filter_one(d["text"])[1]]
    originals = distinct_originals(root, docs, [document_filter.filter_one(d["text"])[0] for d in docs], 260)
    rng = random.Random(0)
    a, b, c = originals[:140], originals[140:220], originals[220:260]
    line = lambda d: json.dumps(d).encode()  # noqa: E731
    exact = [dict(d, id=f"{d['id']}#exact") for d in a[:15]]
    near = [dict(d, id=f"{d['id']}#near", text=edit_words(d["text"], rng)) for d in a[15:30]]
    # inputs, in this order (file index = position): the bad .gz comes first, holding copies of
    # a's documents: if its records went on, those copies would be "earlier" and a's removed
    bad_gz = root / "0_bad.jsonl.gz"
    readable = gz_with_corruption([line(dict(d, id=f"{d['id']}#badfile")) for d in a[:40]] +
                                  [line({"id": f"filler{i}", "text": f"filler record number {i} " * 30})
                                   for i in range(3000)], bad_gz, 0.7)
    a_path = root / "a.jsonl"
    a_lines = [line(d) for d in a]
    for i, raw in enumerate(BAD_RECORDS):  # bad records between good ones
        a_lines.insert(10 + 7 * i, raw.encode("utf-8"))
    a_path.write_bytes(b"\n".join(a_lines) + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wb") as f:  # b's own documents, then copies of a's
        f.write(b"\n".join(line(d) for d in b + exact + near) + b"\n")
    pq.write_table(pa.table({"id": [d["id"] for d in c] + [f"{d['id']}#again" for d in b[:5]],
                             "text": [d["text"] for d in c] + [d["text"] for d in b[:5]],
                             "source": [d["source"] for d in c] + [d["source"] for d in b[:5]]}), root / "c.parquet")
    (root / "d.parquet").write_bytes(b"PAR1 this is not a parquet file\n" * 20)
    zst = root / "e.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as out:
        out.write(b"\n".join(line(dict(d, id=f"{d['id']}#zst")) for d in b[:30]) + b"\n")
    data = zst.read_bytes()
    # truncated (an interrupted download). Garbage inside a zstd block without a checksum (pyarrow
    # writes none) can decode to garbage silently: no reader can name that file
    zst.write_bytes(data[:len(data) // 2])
    paths = [bad_gz, a_path, root / "b.jsonl.gz", root / "c.parquet", root / "d.parquet", zst]
    planted = {"exact": {d["id"] for d in exact} | {f"{d['id']}#again" for d in b[:5]},
               "near": {d["id"] for d in near}, "originals": {d["id"] for d in a[:30] + b[:5]}}
    return root, paths, planted, readable


def write_config(root: Path, paths: list[Path], out: Path) -> Path:
    config = yaml.safe_load((Path(__file__).parents[1] / "examples/laptop/data.yaml").read_text())
    config.update(output_dir=str(out), inputs=[{"path": str(p)} for p in paths])
    config["tokenizer"]["vocab_size"] = 512
    config["tokenize"]["validation_fraction"] = 0.1
    config["compute"].update(max_chars=200_000, batch_size=64)
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def raylm_data(config: Path, tracking: str) -> str:
    proc = subprocess.run(RAYLM + ["data", str(config), "--tracking-uri", tracking], capture_output=True, text=True,
                          timeout=800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def run(corpus):
    root, paths, planted, readable = corpus
    out = root / "out"
    config = write_config(root, paths, out)
    output = raylm_data(config, f"sqlite:///{root}/mlflow.db")
    return out, config, output


def input_records(paths: list[Path]) -> dict[int, dict]:
    """Every record of the inputs the reader yields before any error, by key."""
    records = {}
    for index, path in enumerate(paths):
        try:
            for r in read_file_records(str(path), index, path.name.split(".")[0], "auto", 200_000):
                records[r["key"]] = r
        except Exception:  # noqa: BLE001 - a bad file: what came before the error is in the dict
            pass
    return records


def decoded_shards(out: Path) -> dict[str, list[str]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokens" / "tokenizer.json"))
    index = read_index(out / "tokens")
    texts = {}
    for split, shards in index["splits"].items():
        ids = np.concatenate([np.fromfile(out / "tokens" / s["file"], dtype=index["dtype"]) for s in shards]
                             or [np.zeros(0, np.uint16)])
        ends = np.nonzero(ids == index["eos_token_id"])[0]
        starts = np.r_[0, ends[:-1] + 1]
        assert len(ids) == 0 or ends[-1] == len(ids) - 1  # every document ends in EOS
        texts[split] = [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]
    return texts


def test_shards_hold_exactly_the_kept_documents(corpus, run):
    root, paths, planted, readable = corpus
    out, config_path, _ = run
    stats = json.loads((out / "stats.json").read_text())
    removed = set(np.load(out / "removed_keys.npy").tolist())
    records = input_records(paths)
    # the dedup decision: every planted copy removed, none of their originals
    ids = {key: r["id"] for key, r in records.items()}
    removed_ids = {ids[k] for k in removed}
    assert planted["exact"] <= removed_ids and planted["near"] <= removed_ids
    assert not planted["originals"] & removed_ids
    assert not any(i.endswith("#badfile") for i in removed_ids)  # the bad file took no part in dedup
    # what should be in the shards, computed here: valid records of the files read whole, through
    # the same filters, minus the removed keys, in key order
    config = yaml.safe_load(config_path.read_text())
    document_filter = DocumentFilter(FilterConfig(**config["filters"]))
    bad_files = {0, 4, 5}  # 0_bad.jsonl.gz, d.parquet, e.jsonl.zst
    expected, filtered, quarantined = [], 0, 0
    for key, r in sorted(records.items()):
        if key >> RECORD_BITS in bad_files or r["reason"]:
            quarantined += 1
            continue
        text, reason, _ = document_filter.filter_one(r["text"])
        if reason:
            filtered += 1
        elif key not in removed:
            expected.append((key, r["id"], text))
    manifest = pa.concat_tables([pq.read_table(p) for p in sorted((out / "tokens" / "documents").glob("*.parquet"))])
    assert manifest.column("key").to_pylist() == [k for k, _, _ in expected]
    assert manifest.column("id").to_pylist() == [i for _, i, _ in expected]
    texts = dict((k, t) for k, _, t in expected)
    decoded = decoded_shards(out)
    weights = config["tokenize"]["source_weights"]
    for split in ("train", "validation"):
        rows = [r for r in manifest.to_pylist() if r["split"] == split]
        assert decoded[split] == [texts[r["key"]] for r in rows for _ in range(r["copies"])], split
        for r in rows:  # repeats follow the source weights; validation documents are never repeated
            weight = weights.get(r["source"], 1.0) if split == "train" else 1.0
            assert int(weight) <= r["copies"] <= int(weight) + 1
    assert len(decoded["validation"]) > 0
    # the counts add up, and stats.json says the same
    docs, dedup, tokens = stats["documents"], stats["dedup"], stats["tokens"]
    written = tokens["train"]["documents"] + tokens["validation"]["documents"]
    assert docs["documents_in"] == len(records) and docs["quarantined"] == quarantined
    assert docs["filtered"] == filtered == sum(f["total"] for f in docs["dropped_by_filter"].values())
    assert dedup["documents_removed"] == len(removed) == dedup["exact_duplicates_removed"] + dedup["near_duplicates_removed"]
    assert written + tokens["documents_weighted_out"] == len(expected)
    assert written + tokens["documents_weighted_out"] == (docs["documents_in"] - docs["quarantined"] - docs["filtered"]
                                                          - dedup["documents_removed"])
    assert written == sum(r["copies"] > 0 for r in manifest.to_pylist())
    assert tokens["train"]["sequences"] + tokens["validation"]["sequences"] == sum(map(len, decoded.values()))


def test_bad_files_are_quarantined_whole_by_name(corpus, run):
    root, paths, planted, readable = corpus
    out, _, output = run
    assert readable > 0  # the corrupt .gz did yield records before its error: they are discarded too
    stats = json.loads((out / "stats.json").read_text())
    files = {Path(f["file"]).name: f for f in stats["documents"]["files_quarantined"]}
    assert set(files) == {"0_bad.jsonl.gz", "d.parquet", "e.jsonl.zst"}
    assert files["0_bad.jsonl.gz"]["reason"] == "corrupt_file" and files["0_bad.jsonl.gz"]["records_discarded"] == readable
    assert files["d.parquet"]["reason"] == "not_parquet" and files["d.parquet"]["records_discarded"] == 0
    assert files["e.jsonl.zst"]["reason"] == "corrupt_file"
    assert all(f["raw"] for f in files.values())  # the error itself, for the user
    assert output.count("Traceback") == 0


def test_quarantine_is_valid_jsonl_in_file_and_line_order(corpus, run):
    root, paths, planted, readable = corpus
    out, _, _ = run
    text = (out / "quarantine.jsonl").read_text(encoding="utf-8")
    lines = text.splitlines()  # the strictest splitter: U+2028 / U+0085 inside a record would break it
    assert len(lines) == text.count("\n")
    rows = [json.loads(line) for line in lines]
    by_name = {Path(p).name: i for i, p in enumerate(paths)}
    order = [(by_name[Path(r["file"]).name], r["line"] or 0) for r in rows]
    assert order == sorted(order)
    records = [r for r in rows if r["line"] is not None and r["file"].endswith("a.jsonl")]
    assert [r["reason"] for r in records] == ["malformed_json", "non_string_text", "malformed_json", "non_string_text"]
    assert "\u2028" in records[0]["raw"] and "\u0085" in records[0]["raw"] and "\x00" in records[2]["raw"]
    assert [r["id"] for r in records] == ["", "31", "", "u2028"]  # the id where the record parsed
    assert records[1]["source"] == "forum" and records[0]["source"] == "a"
    files = [r for r in rows if r["line"] is None]
    assert [Path(r["file"]).name for r in files] == ["0_bad.jsonl.gz", "d.parquet", "e.jsonl.zst"]


def test_rerun_says_which_phases_it_reused(corpus, run):
    root, _, _, _ = corpus
    out, config, _ = run
    before = (out / "tokens" / "index.json").read_bytes()
    output = raylm_data(config, f"sqlite:///{root}/mlflow.db")
    for phase in ("documents", "dedup", "tokenizer", "tokens"):
        assert f"raylm data: {phase}: reused" in output and str(out) in output, output[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["reused"]) == {"documents", "dedup", "tokenizer", "tokens"}
    assert (out / "tokens" / "index.json").read_bytes() == before


def test_keep_batch_drops_removed_filtered_and_bad_file_rows():
    from raylm.pipelines.data import keep_batch

    keys = [(1 << RECORD_BITS) + 1, (1 << RECORD_BITS) + 2, (2 << RECORD_BITS) + 1, (3 << RECORD_BITS) + 5, 7]
    batch = pa.table({"key": pa.array(keys, pa.int64()), "id": list("abcde"), "source": ["s"] * 5,
                      "text": ["t"] * 5, "reason": ["", "", "", "", "c4:min_sentences"]})
    kept = keep_batch(batch, np.array([keys[1]]), np.array([3]))
    assert kept.column("id").to_pylist() == ["a", "c"]
    assert keep_batch(batch, np.zeros(0, np.int64), np.zeros(0, np.int64)).column("id").to_pylist() == list("abcd")
    with pytest.raises(TypeError):  # an unresolved ObjectRef (or anything not an array) is refused
        keep_batch(batch, object(), np.zeros(0, np.int64))


def test_language_drops_name_the_configured_languages_and_sum_the_rest():
    from raylm.pipelines.data import _by_filter

    reasons = {"language:zxx": 3, "language:pcm": 2, "language:ace": 1, "language:low_confidence": 4,
               "gopher_quality:min_words": 5}
    assert _by_filter(reasons, ["en", "fr"]) == {"language": {"total": 10, "low_confidence": 4, "other": 6},
                                                 "gopher_quality": {"total": 5, "min_words": 5}}


def test_special_token_text_in_a_document_is_not_a_document_boundary(tmp_path):
    from tokenizers import Tokenizer

    from raylm.actors.data.shard_tokenizer import ShardTokenizer
    from raylm.data.tokenizer import EOS_ID, train_tokenizer

    texts = ["plain text here", "a chat log: <|user|> hi <|eos|> and more", "last one"]
    train_tokenizer(texts * 50, 300, tmp_path / "tok.json")
    writer = ShardTokenizer(str(tmp_path / "tok.json"), str(tmp_path / "shards"), 300, EOS_ID, 0.0, {}, 0)
    entries = writer(pa.table({"key": pa.array([1, 2, 3], pa.int64()), "id": ["a", "b", "c"], "source": ["s"] * 3,
                               "text": texts}))
    ids = np.fromfile(tmp_path / "shards" / entries.column("file")[0].as_py(), dtype=np.uint16)
    ends = np.nonzero(ids == EOS_ID)[0]
    assert len(ends) == 3  # the "<|eos|>" inside the second document is text
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok.json"))
    starts = np.r_[0, ends[:-1] + 1]
    assert [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)] == texts
    manifest = pq.read_table(tmp_path / "shards" / "documents")
    assert manifest.column("id").to_pylist() == ["a", "b", "c"] and manifest.column("copies").to_pylist() == [1, 1, 1]


def test_a_curated_input_skips_the_quality_filters_and_nothing_else(corpus, tmp_path):
    """``inputs[].quality_filters: false``: the tool-use transcripts the laptop demo mixes into
    pretraining, which the web-text heuristics drop, reach the shards whole; the same kind of text in
    an ordinary input is still dropped, and a curated exact copy is still removed by dedup."""
    from raylm.tasks import tool_use

    root, _, _, _ = corpus
    problems = tool_use.problems("train", 60, 5)
    bundles = [{"id": f"t{i}", "text": "\n".join(tool_use.render_plain([{"role": "user", "content": p.prompt}] + p.solution)
                                                for p in problems[i * 6:(i + 1) * 6])} for i in range(10)]
    curated, ordinary = bundles[:6] + [dict(bundles[0], id="t0#copy")], bundles[6:]
    (tmp_path / "curated.jsonl").write_text("".join(json.dumps(d) + "\n" for d in curated))
    (tmp_path / "ordinary.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ordinary))
    config_path = write_config(tmp_path, [], tmp_path / "out")
    config = yaml.safe_load(config_path.read_text())
    config["inputs"] = [{"path": str(root / "a.jsonl")},
                        {"path": str(tmp_path / "curated.jsonl"), "source": "transcripts", "quality_filters": False},
                        {"path": str(tmp_path / "ordinary.jsonl"), "source": "ordinary"}]
    config_path.write_text(yaml.safe_dump(config))
    raylm_data(config_path, f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "out"
    document_filter = DocumentFilter(FilterConfig(**config["filters"]))
    for d in ordinary:  # what the heuristics do to this text in an ordinary input
        assert document_filter.filter_one(d["text"])[1].startswith("gopher_quality:")
    manifest = pa.concat_tables([pq.read_table(p) for p in sorted((out / "tokens" / "documents").glob("*.parquet"))])
    rows = {r["id"]: r for r in manifest.to_pylist()}
    assert not {d["id"] for d in ordinary} & set(rows)
    assert "t0#copy" not in rows  # dedup still applies to a curated input
    decoded = [t for texts in decoded_shards(out).values() for t in texts]
    for d in curated[:6]:  # each curated document, normalised, whole and once in the shards
        assert rows[d["id"]]["source"] == "transcripts"
        assert decoded.count(document_filter.filter_one(d["text"], quality=False)[0]) == 1, d["id"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"]["dropped_by_filter"]["gopher_quality"]["total"] >= len(ordinary)
