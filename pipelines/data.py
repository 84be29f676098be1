"""`raylm data`: raw text -> training-ready token shards, as streaming Ray Data stages.

1. documents: read every input file (one task per file; bad records quarantined, never raised) ->
   normalise, filter, redact PII (actor pool) -> exact hash + MinHash LSH keys (actor pool) -> parquet.
2. dedup: exact duplicates grouped by content hash; near duplicates grouped by LSH band (hash shuffle),
   bucket edges -> union-find components; every group keeps its first document in input order.
3. final: what survives, re-weighted per source (mixing) and assigned to train / validation.
4. tokenizer: byte-level BPE trained on the final train documents (or a given tokenizer.json).
5. tokens: tokenization actor pool -> shards + index.json (raylm.token_shards format).

Each phase writes into a temporary folder and renames it when complete, with a ``.done`` marker
holding its statistics; a run restarted on the same output directory skips finished phases and redoes
an interrupted one from its start. Rows flow in input order (Ray Data ``preserve_order``), so the
output is the same whether or not the run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from raylm.actors.dedup import DedupConfig, DedupSignatures, bucket_edges, duplicate_clusters, exact_duplicates, explode_bands
from raylm.actors.document_reader import expand_paths, read_files
from raylm.actors.quality_filters import DocumentFilter, FilterConfig
from raylm.actors.tokenize import TokenizeDocuments
from raylm.config import ConfigError, Section, StageConfig
from raylm.token_shards import TokenShardWriter, write_index
from raylm.tokenizer import EOS_ID, train_tokenizer, vocab_size_of
from raylm.tracking import StageRun


class InputConfig(Section):
    path: str  # a file, a directory, a glob, or a URI pyarrow opens (s3://bucket/prefix)
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    source: str | None = None  # default: a record's own "source", else the file's name
    text_column: str = "text"  # parquet only


class MixingConfig(Section):
    # source -> weight: 2.0 keeps every document twice, 0.5 about half of them; unlisted sources 1.0
    weights: dict[str, float] = {}


class TokenizerConfig(Section):
    path: str | None = None  # an existing tokenizer.json; None: train one on the filtered corpus
    vocab_size: int = Field(default=4096, ge=263)
    min_frequency: int = Field(default=2, ge=1)
    max_documents: int | None = Field(default=200_000, ge=1)  # training sample (first N train documents)


class ShardsConfig(Section):
    validation_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    shard_tokens: int = Field(default=1 << 24, ge=1)


class Config(StageConfig):
    output_dir: str = "out/data"
    inputs: list[InputConfig] = []  # empty: the embedded corpus built from the Python standard library
    max_document_chars: int = Field(default=1_000_000, ge=1)  # longer documents are quarantined
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    mixing: MixingConfig = MixingConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardsConfig = ShardsConfig()
    actors: int = Field(default=2, ge=1)  # max actors per pool
    batch_size: int = Field(default=256, ge=1)


def check(config: Config, config_path) -> None:
    for i, inp in enumerate(config.inputs):
        if "://" not in inp.path and not expand_paths(inp.path):
            raise ConfigError(f"{config_path}: inputs.{i}.path: {inp.path} matches no file")
    if config.tokenizer.path and not Path(config.tokenizer.path).exists():
        raise ConfigError(f"{config_path}: tokenizer.path: {config.tokenizer.path} does not exist")
    for source, weight in config.mixing.weights.items():
        if weight < 0:
            raise ConfigError(f"{config_path}: mixing.weights.{source}: must be >= 0, got {weight}")


# ----------------------------------------------------------------------------- phases and their markers

def run_phase(out: Path, name: str, fn) -> dict:
    """Run ``fn(tmp_dir) -> stats`` unless ``<name>.done`` exists; rename tmp_dir -> ``<name>`` on success."""
    work = out / "work"
    marker, final, tmp = work / f"{name}.done", work / name, work / f"{name}.tmp"
    if marker.exists():
        print(f"raylm data: {name}: already done, skipped (resume)", flush=True)
        return json.loads(marker.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    stats = fn(tmp)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    tmp.rename(final)
    marker.write_text(json.dumps(stats, indent=1))
    print(f"raylm data: {name}: done in {stats['seconds']:.1f}s", flush=True)
    return stats


def unit_hash(key: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (key, salt): deterministic sampling and splitting."""
    digest = hashlib.blake2b(key.to_bytes(8, "little", signed=True), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "little") / 2**64


def _kept(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["reason"], ""))


# ----------------------------------------------------------------------------- 1. documents

def input_files(config: Config) -> list[dict]:
    from raylm.corpus import build_embedded_corpus

    inputs = config.inputs or [InputConfig(path=str(build_embedded_corpus(config.output_path / "raw")), format="jsonl")]
    files = []
    for inp in inputs:
        for path in expand_paths(inp.path):
            files.append({"path": path, "file_index": len(files) + 1, "format": inp.format,
                          "source": inp.source or Path(path).name.split(".")[0], "text_column": inp.text_column})
    if not files:
        raise ConfigError("inputs: no input file found")
    return files


def documents_phase(config: Config):
    import ray

    def fn(tmp: Path) -> dict:
        files = input_files(config)
        ds = ray.data.from_items(files, override_num_blocks=len(files))
        ds = ds.map_batches(read_files, fn_kwargs={"max_chars": config.max_document_chars}, batch_size=1,
                            batch_format="pyarrow")
        pool = dict(concurrency=(1, config.actors), batch_size=config.batch_size, batch_format="pyarrow")
        ds = ds.map_batches(DocumentFilter, fn_constructor_args=(config.filters,), **pool)
        ds = ds.map_batches(DedupSignatures, fn_constructor_args=(config.dedup,), **pool)
        ds.write_parquet(str(tmp / "parquet"))
        return document_stats(tmp, len(files), config.output_path / "quarantine.jsonl")

    return fn


def document_stats(folder: Path, n_files: int, quarantine_path: Path) -> dict:
    """Counts per source and drop reason, bytes in and out, PII redactions; quarantined rows to JSONL."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(folder / "parquet", format="parquet")
    docs_in, bytes_in, docs_out, bytes_out = Counter(), Counter(), Counter(), Counter()
    reasons: Counter = Counter()
    pii: Counter = Counter()
    pii_columns = [c for c in dataset.schema.names if c.startswith("pii_")]
    tmp = quarantine_path.with_name(quarantine_path.name + ".tmp")
    with tmp.open("w") as quarantine:
        for batch in dataset.to_batches(columns=["source", "reason", "bytes", "text", "file", "line", "raw"] + pii_columns):
            table = pa.Table.from_batches([batch])
            for column in pii_columns:
                pii[column.removeprefix("pii_")] += int(pc.sum(table[column]).as_py() or 0)
            for source, reason, size, text in zip(*(table[c].to_pylist() for c in ("source", "reason", "bytes", "text"))):
                docs_in[source] += 1
                bytes_in[source] += size
                if reason:
                    reasons[reason] += 1
                else:
                    docs_out[source] += 1
                    bytes_out[source] += len(text.encode("utf-8"))
            bad = table.filter(pc.starts_with(table["reason"], "quarantine:"))
            for file, line, reason, raw in zip(*(bad[c].to_pylist() for c in ("file", "line", "reason", "raw"))):
                quarantine.write(json.dumps({"file": file, "line": line, "reason": reason.removeprefix("quarantine:"),
                                             "content": raw}, ensure_ascii=False) + "\n")
    tmp.replace(quarantine_path)
    by_stage = defaultdict(Counter)
    for reason, n in reasons.items():
        stage, _, rule = reason.partition(":")
        by_stage[stage][rule or stage] += n
    return {"files": n_files, "documents_in": sum(docs_in.values()), "documents_out": sum(docs_out.values()),
            "bytes_in": sum(bytes_in.values()), "bytes_out": sum(bytes_out.values()),
            "per_source": {s: {"documents_in": docs_in[s], "documents_out": docs_out[s], "bytes_in": bytes_in[s],
                               "bytes_out": bytes_out[s]} for s in sorted(docs_in)},
            "dropped": {stage: dict(sorted(c.items())) for stage, c in sorted(by_stage.items())},
            "pii_redacted": dict(pii)}


# ----------------------------------------------------------------------------- 2. dedup

def dedup_phase(config: Config, documents: Path):
    import ray

    def fn(tmp: Path) -> dict:
        kept = ray.data.read_parquet(str(documents), columns=["key", "reason", "hash", "bands", "signature"])
        kept = kept.map_batches(_kept, batch_format="pyarrow", batch_size=None)
        n_in = kept.count()
        exact: set[int] = set()
        if config.dedup.exact:
            groups = kept.select_columns(["key", "hash"]).groupby("hash").map_groups(exact_duplicates, batch_format="pyarrow")
            exact = {int(k) for batch in groups.iter_batches(batch_format="pyarrow") for k in batch["key"].to_pylist()}
        near: set[int] = set()
        cluster_sizes: Counter = Counter()
        if config.dedup.minhash.enabled:
            drop = pa.array(sorted(exact), pa.int64())
            survivors = kept.map_batches(lambda t: t.filter(pc.invert(pc.is_in(t["key"], drop))), batch_format="pyarrow")
            columns = ["key", "bands"] + (["signature"] if config.dedup.minhash.jaccard_threshold is not None else [])
            rows = survivors.select_columns(columns).map_batches(explode_bands, batch_format="pyarrow")
            edges = rows.groupby("band").map_groups(bucket_edges, batch_format="pyarrow",
                                                    fn_kwargs={"jaccard_threshold": config.dedup.minhash.jaccard_threshold})
            pairs = [(a, b) for batch in edges.iter_batches(batch_format="pyarrow")
                     for a, b in zip(batch["src"].to_pylist(), batch["dst"].to_pylist())]
            for root, members in duplicate_clusters(pairs).items():
                cluster_sizes[len(members)] += 1
                near.update(m for m in members if m != root)
        removed = pa.table({"key": pa.array(sorted(exact) + sorted(near), pa.int64()),
                            "reason": ["exact_duplicate"] * len(exact) + ["near_duplicate"] * len(near)})
        import pyarrow.parquet as pq

        pq.write_table(removed, tmp / "removed.parquet")
        return {"documents_in": n_in, "exact_duplicates": len(exact), "near_duplicates": len(near),
                "documents_out": n_in - len(exact) - len(near),
                "near_duplicate_clusters": sum(cluster_sizes.values()),
                "cluster_sizes": {str(k): v for k, v in sorted(cluster_sizes.items())}}

    return fn


# ----------------------------------------------------------------------------- 3. final

class SelectAndMix:
    """Drops filtered and duplicate rows, repeats/samples each source by its weight, assigns the split.
    A document's copies all go to the split of the document, so validation never sees a training text."""

    def __init__(self, removed_keys, weights: dict[str, float], validation_fraction: float, seed: int):
        self.removed = pa.array(removed_keys, pa.int64())
        self.weights, self.validation_fraction, self.seed = weights, validation_fraction, seed

    def __call__(self, table: pa.Table) -> pa.Table:
        table = _kept(table)
        table = table.filter(pc.invert(pc.is_in(table["key"], self.removed)))
        rows, copies, splits = [], [], []
        for i, (key, source) in enumerate(zip(table["key"].to_pylist(), table["source"].to_pylist())):
            weight = self.weights.get(source, 1.0)
            n = int(weight) + (unit_hash(key, f"mix{self.seed}") < weight - int(weight))
            split = "validation" if unit_hash(key, f"split{self.seed}") < self.validation_fraction else "train"
            for copy in range(n):
                rows.append(i), copies.append(copy), splits.append(split)
        out = table.select(["key", "source", "text"]).take(pa.array(rows, pa.int64()))
        return out.append_column("copy", pa.array(copies, pa.int32())).append_column("split", pa.array(splits, pa.string()))


def final_phase(config: Config, documents: Path, removed: Path):
    import pyarrow.parquet as pq
    import ray

    def fn(tmp: Path) -> dict:
        removed_keys = pq.read_table(removed, columns=["key"])["key"].to_pylist()
        ds = ray.data.read_parquet(str(documents), columns=["key", "source", "text", "reason"])
        ds = ds.map_batches(SelectAndMix, fn_constructor_args=(removed_keys, config.mixing.weights,
                                                               config.shards.validation_fraction, config.seed),
                            concurrency=(1, config.actors), batch_size=config.batch_size, batch_format="pyarrow")
        ds.write_parquet(str(tmp / "parquet"))
        counts = defaultdict(Counter)
        for batch in ray.data.read_parquet(str(tmp / "parquet"), columns=["source", "split"]).iter_batches(batch_format="pyarrow"):
            for source, split in zip(batch["source"].to_pylist(), batch["split"].to_pylist()):
                counts[source][split] += 1
        return {"documents_out": sum(sum(c.values()) for c in counts.values()),
                "per_source": {s: dict(c) for s, c in sorted(counts.items())}}

    return fn


# ----------------------------------------------------------------------------- 4 + 5. tokenizer and tokens

def tokenizer_phase(config: Config, final: Path):
    import ray

    def fn(tmp: Path) -> dict:
        if config.tokenizer.path:
            shutil.copyfile(config.tokenizer.path, tmp / "tokenizer.json")
            return {"trained": False, "vocab_size": vocab_size_of(tmp / "tokenizer.json")}

        def texts():
            n = 0
            ds = ray.data.read_parquet(str(final), columns=["text", "split", "copy"])
            for batch in ds.iter_batches(batch_format="pyarrow"):
                for text, split, copy in zip(batch["text"].to_pylist(), batch["split"].to_pylist(), batch["copy"].to_pylist()):
                    if split == "train" and copy == 0:
                        yield text
                        n += 1
                        if config.tokenizer.max_documents and n >= config.tokenizer.max_documents:
                            return

        train_tokenizer(texts(), config.tokenizer.vocab_size, tmp / "tokenizer.json",
                        min_frequency=config.tokenizer.min_frequency)
        return {"trained": True, "vocab_size": vocab_size_of(tmp / "tokenizer.json")}

    return fn


def tokens_phase(config: Config, final: Path, tokenizer_file: Path):
    import ray

    def fn(tmp: Path) -> dict:
        vocab_size = vocab_size_of(tokenizer_file)
        ds = ray.data.read_parquet(str(final), columns=["text", "split"])
        ds = ds.map_batches(TokenizeDocuments, fn_constructor_args=(str(tokenizer_file),), concurrency=(1, config.actors),
                            batch_size=config.batch_size, batch_format="pyarrow")
        writers = {split: TokenShardWriter(tmp, split, vocab_size, EOS_ID, shard_tokens=config.shards.shard_tokens)
                   for split in ("train", "validation")}
        start = time.perf_counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tokens = batch["tokens"]
            offsets = tokens.offsets.to_numpy()
            values = tokens.values.to_numpy()
            for i, split in enumerate(batch["split"].to_pylist()):
                writers[split].add(values[offsets[i] : offsets[i + 1]])
        splits = {split: writer.close() for split, writer in writers.items()}
        write_index(tmp, vocab_size, EOS_ID, splits)
        seconds = time.perf_counter() - start
        stats = {split: {"documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                         "shards": len(entries)} for split, entries in splits.items()}
        total = sum(s["tokens"] for s in stats.values())
        return {**stats, "tokens": total, "tokens_per_s": total / max(seconds, 1e-9)}

    return fn


# ----------------------------------------------------------------------------- the stage

def run(config: Config, stage_run: StageRun) -> dict:
    import ray

    from raylm.ray_init import init_ray

    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    init_ray(config.ray)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same order in, same shards out: resumable, reproducible
    context.enable_progress_bars = False
    start = time.perf_counter()
    work = out / "work"
    stats = {"documents": run_phase(out, "documents", documents_phase(config))}
    stats["dedup"] = run_phase(out, "dedup", dedup_phase(config, work / "documents" / "parquet"))
    stats["final"] = run_phase(out, "final", final_phase(config, work / "documents" / "parquet", work / "dedup" / "removed.parquet"))
    stats["tokenizer"] = run_phase(out, "tokenizer", tokenizer_phase(config, work / "final" / "parquet"))
    tokenizer_file = out / "tokenizer.json"
    shutil.copyfile(work / "tokenizer" / "tokenizer.json", tokenizer_file)
    stats["tokens"] = run_phase(out, "tokens", tokens_phase(config, work / "final" / "parquet", tokenizer_file))
    tokens_dir = out / "tokens"
    if not (tokens_dir / "index.json").exists() or (work / "tokens" / "index.json").stat().st_mtime > (tokens_dir / "index.json").stat().st_mtime:
        shutil.rmtree(tokens_dir, ignore_errors=True)
        shutil.copytree(work / "tokens", tokens_dir)
    seconds = time.perf_counter() - start
    stats["seconds"] = seconds
    stats["documents_per_s"] = stats["documents"]["documents_in"] / max(seconds, 1e-9)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    metrics = flat_metrics(stats)
    stage_run.log_metrics(metrics)
    stage_run.log_dict(stats, "stats.json")
    stage_run.log_artifact(tokenizer_file)
    summary = (f"raylm data: {stats['documents']['documents_in']} documents in, {stats['dedup']['documents_out']} kept "
               f"({stats['dedup']['exact_duplicates']} exact and {stats['dedup']['near_duplicates']} near duplicates removed), "
               f"{stats['tokens']['tokens']:,} tokens in {tokens_dir} ({seconds:.1f}s)")
    print(summary, flush=True)
    return {"tokens_dir": str(tokens_dir), "tokenizer": str(tokenizer_file), **metrics}


def flat_metrics(stats: dict) -> dict[str, float]:
    """Every number in stats.json as an MLflow metric name ("documents.dropped.c4.min_sentences")."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}".replace(" ", "_")
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value)

    walk(stats, "")
    return out
