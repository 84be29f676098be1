"""`raylm data`: raw text -> filtered, deduplicated, tokenized training shards, on Ray Data.

Phases, each streaming through ``map_batches`` stages and each finished with a marker file, so a
run killed mid-way and restarted on the same ``output_dir`` redoes only the unfinished phase and ends
with the same bytes as an uninterrupted run:

1. ``documents/``: read (one task per file) -> normalise + quality filters + PII (actor pool) ->
   MinHash signatures (actor pool) -> parquet. Bad records go to ``quarantine.jsonl`` with file,
   line and reason; every valid record of the same file goes on. A file that cannot be read whole
   (corrupt compression, binary, unreadable, not its format) is quarantined whole, by name and
   reason: none of its records goes on, those read before the error included, and they count as
   quarantined; every other file goes on.
2. ``removed_keys.npy``: exact and near duplicates from the signatures alone: bucket-shard tasks find
   the candidate links, rounds of partition tasks their clusters (actors/data/connected_components.py);
   each cluster keeps its earliest document.
3. ``tokenizer.json``: byte-level BPE trained on the kept documents, streamed.
4. ``tokens/``: the tokenization actor pool writes shards, and per shard batch the kept documents'
   key, id, source, split and copies (``tokens/documents/*.parquet``, in shard order);
   ``tokens/index.json`` is written last.
Per-phase counts, drop reasons, characters and tokens go to ``stats.json`` and the MLflow run. The
counts add up: documents_in - quarantined - filtered - duplicates removed = documents_written, the
distinct documents in the shards (source weights then repeat training documents: counted apart).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from typing import Annotated

import numpy as np
from pydantic import Field, field_validator

from raylm.actors.data.document_reader import FILE_QUARANTINE, RECORD_BITS, expand_paths, read_files
from raylm.actors.data.connected_components import duplicate_clusters, ray_runner
from raylm.actors.data.minhash_dedup import DedupConfig, MinHashSignatures, bucket_edges
from raylm.actors.data.quality_filters import DocumentFilter, FilterConfig
from raylm.actors.data.shard_tokenizer import ShardTokenizer
from raylm.config import ConfigError, FromConfigFolder, InputPath, Section, StageConfig, resolved_dict
from raylm.data.token_shards import write_index
from raylm.data.tokenizer import EOS_ID, MIN_VOCAB_SIZE, train_tokenizer, vocab_size_of
from raylm.tracking import StageRun

EMBEDDED = "embedded"  # the input path that means "the standard-library corpus, built on the fly"
QUARANTINE = "quarantine:"  # the reader's reason prefix for bad input


class InputConfig(Section):
    path: Annotated[str, FromConfigFolder(keep=("embedded",))]  # a file, a directory, a glob, or s3://... ; "embedded" for the stdlib corpus
    source: str | None = None  # the source name of all its records, for mixing; default: the record's own, else the file stem
    # false: a curated input (e.g. task transcripts) that the heuristic and model quality filters would
    # misjudge as web text; normalisation, bad words, PII redaction and dedup still apply to it
    quality_filters: bool = True


class TokenizerConfig(Section):
    # tokens in the trained vocabulary, the 7 special tokens and 256 bytes included
    vocab_size: int = Field(default=8192, ge=MIN_VOCAB_SIZE)
    min_frequency: int = Field(default=2, ge=1)  # a BPE merge is learnt only from a pair seen at least this often
    max_documents: int | None = Field(default=None, ge=1)  # train on the first N kept documents
    split_digits: bool = False  # every digit its own token (Llama, DeepSeek): numbers read digit by digit
    file: InputPath | None = None  # an existing tokenizer.json to use instead of training one


class TokenizeConfig(Section):
    # fraction of documents (by a hash of their key) put in the validation split
    validation_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    source_weights: dict[str, float] = {}  # source -> copies of each training document (default 1.0)

    @field_validator("source_weights")
    @classmethod
    def _weights(cls, value):
        for source, weight in value.items():
            if weight < 0:
                raise ValueError(f"source_weights: {source}: weight must be >= 0, got {weight}")
        return value


class ComputeConfig(Section):
    workers: int = Field(default=2, ge=1)  # actors per pool, at most
    batch_size: int = Field(default=256, ge=1)  # documents per map_batches call
    max_chars: int = Field(default=1_000_000, ge=1)  # longer documents are quarantined
    object_store_budget: int | None = Field(default=None, ge=1 << 16)  # bytes Ray Data may hold at once
    # Custom Ray resources every task and actor of this stage asks for: placement on a node type,
    # e.g. {data_node: 0.01} with the cluster configs of cluster/ (CPU nodes carry `data_node`).
    resources: dict[str, float] = Field(default_factory=dict)

    def remote_args(self) -> dict:
        return {"resources": dict(self.resources)} if self.resources else {}


class Config(StageConfig):
    # the input files; of duplicates, the copy in the earliest file (then earliest line) is kept
    inputs: list[InputConfig] = [InputConfig(path=EMBEDDED)]
    filters: FilterConfig = FilterConfig()  # the quality filters and PII redaction, applied in a fixed order
    dedup: DedupConfig = DedupConfig()  # exact and MinHash near-duplicate removal
    # the byte-level BPE tokenizer, trained on the kept documents unless file is set
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()  # the token shards: validation split and source mixing
    compute: ComputeConfig = ComputeConfig()  # Ray Data parallelism and memory limits


def check(config: Config, config_path) -> None:
    for i, item in enumerate(config.inputs):
        if item.path != EMBEDDED and not expand_paths(item.path):
            raise ConfigError(f"{config_path}: inputs.{i}.path: {item.path!r} matches no file")
    if config.tokenizer.file is not None and not Path(config.tokenizer.file).exists():
        raise ConfigError(f"{config_path}: tokenizer.file: {config.tokenizer.file} does not exist")


def _fingerprint(config: Config) -> str:
    """What the outputs depend on (not where they go, nor how many workers compute them)."""
    data = resolved_dict(config)
    for key in ("output_dir", "tracking", "ray", "compute"):
        data.pop(key)
    data["max_chars"] = config.compute.max_chars
    data["outputs_version"] = OUTPUTS_VERSION  # outputs of an older raylm are rebuilt, never reused
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


OUTPUTS_VERSION = 2  # 2: whole-file quarantine, distinct documents_written, tokens/documents/
OUTPUTS = ("documents", "tokens", "quarantine.jsonl", "removed_keys.npy", "tokenizer.json", "stats.json")


class Phases:
    """Marker files in the output directory: ``<phase>.done.json`` holds the phase's stats."""

    def __init__(self, out: Path, fingerprint: str):
        self.out = out
        self.reused: dict[str, str] = {}  # phase -> the marker of the earlier run it was taken from
        state = out / "data_state.json"
        previous = json.loads(state.read_text())["fingerprint"] if state.exists() else None
        if previous not in (None, fingerprint):  # another config's outputs: start over, never mix
            print(f"raylm data: {out} holds outputs of a different data config; rebuilding", flush=True)
            for name in OUTPUTS:
                _remove(out / name)
            for marker in out.glob("*.done.json"):
                marker.unlink()
        out.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"fingerprint": fingerprint}))

    def run(self, name: str, body) -> tuple[dict, float]:
        marker = self.out / f"{name}.done.json"
        start = time.perf_counter()
        if marker.exists():
            finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(marker.stat().st_mtime))
            print(f"raylm data: {name}: reused, not recomputed: finished {finished} by an earlier run with the "
                  f"same data config into {self.out} ({marker.name}); remove it or use another output_dir to "
                  f"recompute", flush=True)
            self.reused[name] = str(marker)
            return json.loads(marker.read_text()), 0.0
        stats = body()
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(marker)
        return stats, round(time.perf_counter() - start, 2)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def input_files(config: Config) -> list[tuple[str, InputConfig]]:
    """Every input file, in order, with the ``inputs`` entry it came from."""
    files = []
    for item in config.inputs:
        if item.path == EMBEDDED:
            from raylm.data.stdlib_corpus import build_embedded_corpus

            files.append((str(build_embedded_corpus(config.output_path / "embedded_corpus")), item))
        else:
            files += [(f, item) for f in expand_paths(item.path)]
    return files


def read_documents(config: Config, files: list[tuple[str, InputConfig]]):
    """The raw rows of every input file (``input_files``), one read task per file."""
    import ray

    items = [{"file_index": i, "path": path, "source": item.source or Path(path).name.split(".")[0],
              "source_is_set": item.source is not None, "format": "auto", "text_column": "text"}
             for i, (path, item) in enumerate(files)]
    if len(items) >= 1 << (63 - RECORD_BITS):
        raise ConfigError(f"inputs: {len(items)} files; at most {(1 << (63 - RECORD_BITS)) - 1} are supported")
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_files, batch_size=1, fn_kwargs={"max_chars": config.compute.max_chars}, **config.compute.remote_args())


def phase_documents(config: Config, out: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ray.data import ActorPoolStrategy

    _remove(out / "documents")
    c = config.compute
    files = input_files(config)
    ds = read_documents(config, files)
    curated = [i for i, (_, item) in enumerate(files) if not item.quality_filters]
    ds = ds.map_batches(DocumentFilter, fn_constructor_args=(config.filters, curated), batch_size=c.batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=c.workers),
                        **c.remote_args())
    ds = ds.map_batches(MinHashSignatures, fn_constructor_args=(config.dedup,), batch_size=c.batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=c.workers),
                        **c.remote_args())
    ds.write_parquet(str(out / "documents"))
    return count_documents(config, out)


def _file_of(keys: np.ndarray) -> np.ndarray:
    return keys >> RECORD_BITS


def _quarantine_line(row: dict) -> str:
    """One JSON line, whatever the text holds: json.dumps escapes control characters (NUL, CR, LF)
    but not U+0085, U+2028 and U+2029, which str.splitlines() and some JSON readers split lines on."""
    line = json.dumps(row, ensure_ascii=False)
    return line.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def count_documents(config: Config, out: Path) -> dict:
    """Counts, drop reasons and ``quarantine.jsonl`` from the parquet of phase 1, file by file
    (bounded memory); the quarantine is merged from per-file sorted runs into (file, line) order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = sorted((out / "documents").glob("*.parquet"))
    bad_files: dict[int, dict] = {}  # file index -> its quarantine record
    for path in paths:
        table = pq.read_table(path, columns=["key", "reason", "file", "raw"])
        rows = table.filter(pc.starts_with(table.column("reason"), FILE_QUARANTINE))
        for row in rows.to_pylist():
            bad_files[int(row["key"]) >> RECORD_BITS] = {
                "file": row["file"], "line": None, "reason": row["reason"].removeprefix(FILE_QUARANTINE),
                "id": "", "source": "", "raw": row["raw"], "records_discarded": 0}
    excluded = np.array(sorted(bad_files), dtype=np.int64)
    reasons: Counter = Counter()
    pii: Counter = Counter()
    docs_in = chars_out = 0
    runs = []
    for i, path in enumerate(paths):
        table = pq.read_table(path, columns=["key", "id", "source", "text", "reason", "file", "line", "raw",
                                              "pii_email", "pii_phone", "pii_ip_address"])
        table = table.filter(pc.invert(pc.starts_with(table.column("reason"), FILE_QUARANTINE)))
        in_bad_file = np.isin(_file_of(table.column("key").to_numpy()), excluded)
        for index in _file_of(table.column("key").to_numpy()[in_bad_file]).tolist():
            bad_files[index]["records_discarded"] += 1
            reasons[QUARANTINE + bad_files[index]["reason"]] += 1
        docs_in += len(table)
        table = table.filter(pa_array(~in_bad_file))
        reasons.update(table.column("reason").to_pylist())
        for name in ("email", "phone", "ip_address"):
            pii[name] += pc.sum(table.column(f"pii_{name}")).as_py() or 0
        kept = table.filter(pc.equal(table.column("reason"), ""))
        chars_out += sum(len(t) for t in kept.column("text").to_pylist())
        bad = table.filter(pc.starts_with(table.column("reason"), QUARANTINE))
        bad = bad.take(pc.sort_indices(bad, [("key", "ascending")]))
        run = out / f"quarantine.run{i}.tmp"
        with open(run, "w", encoding="utf-8") as f:
            for row in bad.select(["key", "file", "line", "reason", "id", "source", "raw"]).to_pylist():
                key = row.pop("key")
                row["reason"] = row["reason"].removeprefix(QUARANTINE)
                f.write(f"{key:020d}\t" + _quarantine_line(row))
        runs.append(run)
    run = out / "quarantine.files.tmp"
    with open(run, "w", encoding="utf-8") as f:
        for index, row in sorted(bad_files.items()):
            f.write(f"{index << RECORD_BITS:020d}\t" + _quarantine_line(row))
    runs.append(run)
    tmp = out / "quarantine.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as quarantine:
        streams = [open(r, encoding="utf-8", newline="\n") for r in runs]
        try:  # every run is sorted by key (file index, then line): a k-way merge orders the whole file
            for line in heapq.merge(*streams):
                quarantine.write(line.split("\t", 1)[1])
        finally:
            for stream in streams:
                stream.close()
    for r in runs:
        r.unlink()
    tmp.replace(out / "quarantine.jsonl")
    kept_n = reasons.pop("", 0)
    bad_input = {r.removeprefix(QUARANTINE): n for r, n in sorted(reasons.items()) if r.startswith(QUARANTINE)}
    filtered = {r: n for r, n in reasons.items() if not r.startswith(QUARANTINE)}
    return {"documents_in": docs_in, "documents_out": kept_n, "chars_out": chars_out,
            "quarantined": sum(bad_input.values()), "filtered": sum(filtered.values()), "bad_input": bad_input,
            "files_quarantined": [{k: v for k, v in row.items() if k not in ("line", "id", "source")}
                                  for _, row in sorted(bad_files.items())],
            "dropped_by_filter": _by_filter(filtered, config.filters.language_id.languages),
            "pii_redacted": dict(pii)}


def pa_array(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask, pa.bool_())


def _by_filter(reasons: dict, languages: list[str] = ()) -> dict:
    """{"gopher_quality:min_words": 3, ...} -> {"gopher_quality": {"total": 3, "min_words": 3}}.
    Language drops name the configured languages (kept, but under min_confidence) and sum every
    other label py3langid gives (97 of them, "zxx" and the like included) into ``other``."""
    out: dict[str, dict] = {}
    for reason, n in sorted(reasons.items()):
        name, _, rule = reason.partition(":")
        if name == "language" and rule not in languages and rule != "low_confidence":
            rule = "other"
        entry = out.setdefault(name, {"total": 0})
        entry["total"] += n
        if rule:
            entry[rule] = entry.get(rule, 0) + n
    return out


def phase_dedup(config: Config, out: Path) -> dict:
    import ray

    files = sorted(str(p) for p in (out / "documents").glob("*.parquet"))
    cfg, options = config.dedup, config.compute.remote_args()
    task = ray.remote(bucket_edges).options(**options)
    excluded = _excluded_files(out)
    links = [task.remote(files, shard, cfg, excluded) for shard in range(cfg.bucket_shards)]
    submit, fetch = ray_runner(**options)
    removed, stats = duplicate_clusters(links, cfg.bucket_shards, submit, fetch)
    tmp = out / "removed_keys.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, removed)
    tmp.replace(out / "removed_keys.npy")
    return {"documents_removed": len(removed), **stats}


def _excluded_files(out: Path) -> list[int]:
    """The file indices quarantined whole in phase 1 (from its marker): none of their rows goes on."""
    import pyarrow.parquet as pq

    indices = set()
    for path in sorted((out / "documents").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "reason"])
        for key, reason in zip(table.column("key").to_pylist(), table.column("reason").to_pylist()):
            if reason.startswith(FILE_QUARANTINE):
                indices.add(key >> RECORD_BITS)
    return sorted(indices)


def keep_batch(batch, removed: np.ndarray, excluded_files: np.ndarray):
    """The rows that go on to the tokenizer: passed every filter, in no whole-quarantined file, and
    not a removed duplicate. ``removed`` must be the array itself (sorted): an ``ObjectRef`` handed to
    ``map_batches(fn_args=...)`` arrives unresolved on the installed Ray, and ``np.isin`` against it
    silently matches nothing."""
    import pyarrow.compute as pc

    if not isinstance(removed, np.ndarray) or not isinstance(excluded_files, np.ndarray):
        raise TypeError(f"keep_batch: removed keys must be numpy arrays, got {type(removed).__name__}")
    batch = batch.filter(pc.equal(batch.column("reason"), ""))
    keys = batch.column("key").to_numpy()
    keep = ~np.isin(_file_of(keys), excluded_files)
    if len(removed):  # removed is sorted: a binary search per key
        keep &= removed[np.minimum(np.searchsorted(removed, keys), len(removed) - 1)] != keys
    return batch.filter(pa_array(keep)).select(["key", "id", "source", "text"])


def kept_documents(config: Config, out: Path):
    """The filtered documents minus duplicates, streamed from the parquet of phase 1."""
    import ray

    removed = np.sort(np.load(out / "removed_keys.npy", allow_pickle=False))
    excluded = np.array(_excluded_files(out), dtype=np.int64)
    files = sorted(str(p) for p in (out / "documents").glob("*.parquet"))
    if not files:  # no input held a single record (empty files): nothing to tokenize, not an error
        import pyarrow as pa

        return ray.data.from_arrow(pa.table({"key": pa.array([], pa.int64()), "id": pa.array([], pa.string()),
                                             "source": pa.array([], pa.string()), "text": pa.array([], pa.string())}))
    return ray.data.read_parquet(files, columns=["key", "id", "source", "text", "reason"]).map_batches(
        keep_batch, batch_format="pyarrow", fn_args=(removed, excluded), batch_size=config.compute.batch_size,
        **config.compute.remote_args())


def phase_tokenizer(config: Config, out: Path, ds) -> dict:
    path = out / "tokenizer.json"
    if config.tokenizer.file is not None:
        shutil.copyfile(config.tokenizer.file, path)
        return {"trained": False, "vocab_size": vocab_size_of(path)}

    def texts():
        seen = 0
        for batch in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
            for text in batch.column("text").to_pylist():
                if config.tokenizer.max_documents is not None and seen >= config.tokenizer.max_documents:
                    return
                seen += 1
                yield text

    train_tokenizer(texts(), config.tokenizer.vocab_size, path, min_frequency=config.tokenizer.min_frequency,
                    split_digits=config.tokenizer.split_digits)
    return {"trained": True, "vocab_size": vocab_size_of(path)}


def phase_tokens(config: Config, out: Path, ds, vocab_size: int, seconds: dict) -> dict:
    """Writes the shards and their index; ``seconds["tokenize_actors"]``: from the first batch the
    tokenization actors start to the last they finish (the stage's own time, without Ray Data's
    start-up and the parquet reading before its first batch)."""
    from ray.data import ActorPoolStrategy

    shard_dir = out / "tokens"
    _remove(shard_dir)
    shard_dir.mkdir(parents=True)
    c = config.compute
    entries = ds.map_batches(
        ShardTokenizer, batch_size=c.batch_size * 4, batch_format="pyarrow",
        fn_constructor_args=(str(out / "tokenizer.json"), str(shard_dir), vocab_size, EOS_ID,
                             config.tokenize.validation_fraction, config.tokenize.source_weights, config.seed),
        compute=ActorPoolStrategy(min_size=1, max_size=c.workers), **c.remote_args()).take_all()
    if entries:
        seconds["tokenize_actors"] = round(max(e["finished"] for e in entries) - min(e["started"] for e in entries), 2)
    # the index lists shards by their first document key: the stream is in input order
    entries.sort(key=lambda e: (e["first_key"], e["file"]))
    splits: dict[str, list] = {"train": [], "validation": []}
    source_tokens: dict[str, Counter] = {"train": Counter(), "validation": Counter()}
    for e in entries:
        # the index's "documents" is what the shard holds (EOS-ended sequences, repeats included)
        splits[e["split"]].append({"file": e["file"], "tokens": e["tokens"], "documents": e["documents"]})
        source_tokens[e["split"]].update(json.loads(e["source_tokens"]))
    # the shard folder carries its tokenizer, so pretraining can be pointed at tokens/ alone
    shutil.copyfile(out / "tokenizer.json", shard_dir / "tokenizer.json")
    write_index(shard_dir, vocab_size, EOS_ID, splits)
    distinct = written_documents(shard_dir)
    # documents: distinct documents; sequences: what the shards hold once source weights repeat them
    stats = {split: {"tokens": sum(e["tokens"] for e in items), "documents": distinct[split],
                    "sequences": sum(e["documents"] for e in items),
                    "shards": len(items), "tokens_by_source": dict(sorted(source_tokens[split].items()))}
            for split, items in splits.items()}
    # kept training documents a source weight below 1 sampled out: in no shard, listed with copies 0
    stats["documents_weighted_out"] = distinct["weighted_out"]
    return stats


def written_documents(shard_dir: Path) -> Counter:
    """Distinct documents per split in the shards, and the kept training documents a source weight
    below 1 sampled out ("weighted_out"), from the manifests the tokenization actors wrote."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in sorted((shard_dir / "documents").glob("*.parquet")):
        table = pq.read_table(path, columns=["split", "copies"])
        written = pc.greater(table.column("copies"), 0)
        for split in ("train", "validation"):
            counts[split] += pc.sum(pc.and_(written, pc.equal(table.column("split"), split))).as_py() or 0
        counts["weighted_out"] += pc.sum(pc.invert(written)).as_py() or 0
    return counts


def run(config: Config, stage_run: StageRun) -> dict:
    import ray

    out = config.output_path
    phases = Phases(out, _fingerprint(config))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same order in, same shards out
    if config.compute.object_store_budget is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=config.compute.object_store_budget)
    stats: dict = {}
    seconds: dict = {}
    stats["documents"], seconds["documents"] = phases.run("documents", lambda: phase_documents(config, out))
    stats["dedup"], seconds["dedup"] = phases.run("dedup", lambda: phase_dedup(config, out))
    for name in ("documents", "dedup"):
        print(f"raylm data: {name}: {json.dumps(stats[name])}", flush=True)
    ds = kept_documents(config, out)
    stats["tokenizer"], seconds["tokenizer"] = phases.run("tokenizer", lambda: phase_tokenizer(config, out, ds))
    stats["tokens"], seconds["tokens"] = phases.run(
        "tokens", lambda: phase_tokens(config, out, ds, stats["tokenizer"]["vocab_size"], seconds))
    stats["seconds"] = seconds  # 0.0: reused from an earlier run (listed in "reused")
    stats["reused"] = phases.reused
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    metrics = summary_metrics(stats)
    stage_run.log_metrics(metrics)
    stage_run.log_artifact(out / "stats.json")
    stage_run.log_artifact(out / "tokenizer.json")
    return metrics


def summary_metrics(stats: dict) -> dict:
    d, dd, t = stats["documents"], stats["dedup"], stats["tokens"]
    metrics = {
        "documents_in": d["documents_in"], "quarantined": d["quarantined"],
        "documents_after_filters": d["documents_out"],
        "exact_duplicates_removed": dd["exact_duplicates_removed"],
        "near_duplicates_removed": dd["near_duplicates_removed"],
        "documents_filtered": d["filtered"],
        "duplicates_removed": dd["documents_removed"],
        "documents_written": t["train"]["documents"] + t["validation"]["documents"],
        "documents_weighted_out": t["documents_weighted_out"],
        "sequences_written": t["train"]["sequences"] + t["validation"]["sequences"],
        "train_tokens": t["train"]["tokens"], "validation_tokens": t["validation"]["tokens"],
        "vocab_size": stats["tokenizer"]["vocab_size"],
    }
    for name, entry in d["dropped_by_filter"].items():
        metrics[f"dropped_{name}"] = entry["total"]
    for name, n in d["pii_redacted"].items():
        metrics[f"pii_{name}"] = n
    return metrics
