"""`raylm data`: raw text -> filtered, deduplicated, tokenized training shards, on Ray Data.

Phases, each streaming through ``map_batches`` stages and each finished with a marker file, so a
run killed mid-way and restarted on the same ``output_dir`` redoes only the unfinished phase and ends
with the same bytes as an uninterrupted run:

1. ``documents/``: read (one task per file) -> normalise + quality filters + PII (actor pool) ->
   MinHash signatures (actor pool) -> parquet. Bad input goes to ``quarantine.jsonl`` with file,
   line and reason; every valid record of the same file goes on.
2. ``removed_keys.npy``: exact and near duplicates from the signatures alone: bucket-shard tasks find
   the candidate links, rounds of partition tasks their clusters (actors/connected_components.py);
   each cluster keeps its earliest document.
3. ``tokenizer.json``: byte-level BPE trained on the kept documents, streamed.
4. ``tokens/``: the tokenization actor pool writes shards; ``tokens/index.json`` is written last.
Per-phase counts, drop reasons, characters and tokens go to ``stats.json`` and the MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from raylm.actors.document_reader import expand_paths, read_files
from raylm.actors.connected_components import duplicate_clusters, ray_runner
from raylm.actors.minhash_dedup import DedupConfig, MinHashSignatures, bucket_edges
from raylm.actors.quality_filters import DocumentFilter, FilterConfig
from raylm.actors.shard_tokenizer import ShardTokenizer
from raylm.config import ConfigError, Section, StageConfig, resolved_dict
from raylm.ray_init import init_ray
from raylm.token_shards import write_index
from raylm.tokenizer import EOS_ID, MIN_VOCAB_SIZE, train_tokenizer, vocab_size_of
from raylm.tracking import StageRun

EMBEDDED = "embedded"  # the input path that means "the standard-library corpus, built on the fly"
QUARANTINE = "quarantine:"  # the reader's reason prefix for bad input


class InputConfig(Section):
    path: str  # a file, a directory, a glob, or s3://... ; "embedded" for the stdlib corpus
    source: str | None = None  # the source name for mixing; default: the record's own, else the file stem


class TokenizerConfig(Section):
    vocab_size: int = Field(default=8192, ge=MIN_VOCAB_SIZE)
    min_frequency: int = Field(default=2, ge=1)
    max_documents: int | None = Field(default=None, ge=1)  # train on the first N kept documents
    file: str | None = None  # an existing tokenizer.json to use instead of training one


class TokenizeConfig(Section):
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
    inputs: list[InputConfig] = [InputConfig(path=EMBEDDED)]
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    compute: ComputeConfig = ComputeConfig()


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
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


OUTPUTS = ("documents", "tokens", "quarantine.jsonl", "removed_keys.npy", "tokenizer.json", "stats.json")


class Phases:
    """Marker files in the output directory: ``<phase>.done.json`` holds the phase's stats."""

    def __init__(self, out: Path, fingerprint: str):
        self.out = out
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


def input_files(config: Config) -> list[tuple[str, str | None]]:
    files = []
    for item in config.inputs:
        if item.path == EMBEDDED:
            from raylm.corpus import build_embedded_corpus

            files.append((str(build_embedded_corpus(config.output_path / "embedded_corpus")), item.source))
        else:
            files += [(f, item.source) for f in expand_paths(item.path)]
    return files


def read_documents(config: Config):
    """The raw rows of every input, one read task per file."""
    import ray

    items = [{"file_index": i, "path": path, "source": source or Path(path).name.split(".")[0],
              "format": "auto", "text_column": "text"} for i, (path, source) in enumerate(input_files(config))]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_files, batch_size=1, fn_kwargs={"max_chars": config.compute.max_chars}, **config.compute.remote_args())


def phase_documents(config: Config, out: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ray.data import ActorPoolStrategy

    _remove(out / "documents")
    c = config.compute
    ds = read_documents(config)
    ds = ds.map_batches(DocumentFilter, fn_constructor_args=(config.filters,), batch_size=c.batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=c.workers),
                        **c.remote_args())
    ds = ds.map_batches(MinHashSignatures, fn_constructor_args=(config.dedup,), batch_size=c.batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=c.workers),
                        **c.remote_args())
    ds.write_parquet(str(out / "documents"))
    # Counting and the quarantine read the small columns back, file by file: bounded memory.
    reasons: Counter = Counter()
    pii: Counter = Counter()
    docs_in = chars_out = 0
    tmp = out / "quarantine.jsonl.tmp"
    with open(tmp, "w") as quarantine:
        for path in sorted((out / "documents").glob("*.parquet")):
            table = pq.read_table(path, columns=["key", "id", "source", "text", "reason", "file", "line", "raw",
                                                  "pii_email", "pii_phone", "pii_ip_address"])
            docs_in += table.num_rows
            reasons.update(table.column("reason").to_pylist())
            for name in ("email", "phone", "ip_address"):
                pii[name] += pc.sum(table.column(f"pii_{name}")).as_py() or 0
            kept = table.filter(pc.equal(table.column("reason"), ""))
            chars_out += sum(len(t) for t in kept.column("text").to_pylist())
            bad = table.filter(pc.starts_with(table.column("reason"), QUARANTINE))
            for row in bad.select(["file", "line", "reason", "id", "source", "raw"]).to_pylist():
                row["reason"] = row["reason"].removeprefix(QUARANTINE)
                quarantine.write(json.dumps(row, ensure_ascii=False) + "\n")
    # parquet files come back in completion order: sort, so the file is the same every run
    tmp.write_text("".join(sorted(tmp.read_text().splitlines(keepends=True))))
    tmp.replace(out / "quarantine.jsonl")
    kept_n = reasons.pop("", 0)
    bad_input = {r.removeprefix(QUARANTINE): n for r, n in reasons.items() if r.startswith(QUARANTINE)}
    return {"documents_in": docs_in, "documents_out": kept_n, "chars_out": chars_out,
            "quarantined": sum(bad_input.values()), "bad_input": bad_input,
            "dropped_by_filter": _by_filter({r: n for r, n in reasons.items() if not r.startswith(QUARANTINE)}),
            "pii_redacted": dict(pii)}


def _by_filter(reasons: dict) -> dict:
    """{"gopher_quality:min_words": 3, ...} -> {"gopher_quality": {"total": 3, "min_words": 3}}."""
    out: dict[str, dict] = {}
    for reason, n in sorted(reasons.items()):
        name, _, rule = reason.partition(":")
        entry = out.setdefault(name, {"total": 0})
        entry["total"] += n
        if rule:
            entry[rule] = n
    return out


def phase_dedup(config: Config, out: Path) -> dict:
    import ray

    files = sorted(str(p) for p in (out / "documents").glob("*.parquet"))
    cfg, options = config.dedup, config.compute.remote_args()
    task = ray.remote(bucket_edges).options(**options)
    links = [task.remote(files, shard, cfg) for shard in range(cfg.bucket_shards)]
    submit, fetch = ray_runner(**options)
    removed, stats = duplicate_clusters(links, cfg.bucket_shards, submit, fetch)
    tmp = out / "removed_keys.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, removed)
    tmp.replace(out / "removed_keys.npy")
    return stats


def _keep(batch, removed):
    import pyarrow.compute as pc

    batch = batch.filter(pc.equal(batch.column("reason"), ""))
    return batch.filter(~np.isin(batch.column("key").to_numpy(), removed)).select(["key", "source", "text"])


def kept_documents(config: Config, out: Path):
    """The filtered documents minus duplicates, streamed from the parquet of phase 1."""
    import ray

    removed = ray.put(np.load(out / "removed_keys.npy"))
    files = sorted(str(p) for p in (out / "documents").glob("*.parquet"))
    return ray.data.read_parquet(files, columns=["key", "source", "text", "reason"]).map_batches(
        _keep, batch_format="pyarrow", fn_args=(removed,), batch_size=config.compute.batch_size,
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

    train_tokenizer(texts(), config.tokenizer.vocab_size, path, min_frequency=config.tokenizer.min_frequency)
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
        splits[e["split"]].append({"file": e["file"], "tokens": e["tokens"], "documents": e["documents"]})
        source_tokens[e["split"]].update(json.loads(e["source_tokens"]))
    # the shard folder carries its tokenizer, so pretraining can be pointed at tokens/ alone
    shutil.copyfile(out / "tokenizer.json", shard_dir / "tokenizer.json")
    write_index(shard_dir, vocab_size, EOS_ID, splits)
    return {split: {"tokens": sum(e["tokens"] for e in items), "documents": sum(e["documents"] for e in items),
                    "shards": len(items), "tokens_by_source": dict(sorted(source_tokens[split].items()))}
            for split, items in splits.items()}


def run(config: Config, stage_run: StageRun) -> dict:
    import ray

    out = config.output_path
    phases = Phases(out, _fingerprint(config))
    init_ray(config.ray)
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
    stats["seconds"] = seconds  # 0.0: done by an earlier, interrupted run
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
        "documents_written": t["train"]["documents"] + t["validation"]["documents"],
        "train_tokens": t["train"]["tokens"], "validation_tokens": t["validation"]["tokens"],
        "vocab_size": stats["tokenizer"]["vocab_size"],
    }
    for name, entry in d["dropped_by_filter"].items():
        metrics[f"dropped_{name}"] = entry["total"]
    for name, n in d["pii_redacted"].items():
        metrics[f"pii_{name}"] = n
    return metrics
