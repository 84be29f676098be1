"""Decontamination against token shards: which evaluation items share a token n-gram with the
training data, read straight from the shards ``raylm data`` wrote (``raylm.data.token_shards`` format).

Eval items are tokenised with the tokenizer the shards were made with, so an n-gram here is n
consecutive training tokens, exactly what the model saw. Every n-gram of the training stream is
hashed (a 64-bit polynomial hash, vectorised over chunks of the memory-mapped shards) and looked up
among the items' n-gram hashes; memory stays at one chunk plus the items' hashes, whatever the size
of the shards. Items shorter than n tokens cannot be tested and are reported as such.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from raylm.config import ConfigError
from raylm.data.jsonl import records
from raylm.data.token_shards import TokenStream
from raylm.eval.metrics import contaminated
from raylm.eval.tasks import result_key

_BASE = np.uint64(1_000_003)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every n-gram of ``tokens`` (length ``len - n + 1``; empty if shorter than n)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the hash
        for j in range(n):
            hashes = hashes * _BASE + tokens[j : j + count] + np.uint64(1)
    return hashes


def shard_tokenizer(shard_dir: str | Path) -> Path:
    """The tokenizer.json next to the shards (``raylm data`` writes it beside the tokens folder)."""
    shard_dir = Path(shard_dir)
    for candidate in (shard_dir / "tokenizer.json", shard_dir.parent / "tokenizer.json"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{shard_dir}: no tokenizer.json beside the token shards; name it explicitly")


def contaminated_items(items: list[list[int]], shard_dir: str | Path, n: int = 13, split: str = "train",
                       chunk_tokens: int = 1 << 22) -> list[bool | None]:
    """For each tokenised item: True if one of its n-grams occurs in the split's token stream,
    False if none does, None if the item is shorter than n tokens."""
    item_hashes = [ngram_hashes(np.asarray(tokens), n) for tokens in items]
    wanted = np.unique(np.concatenate(item_hashes)) if item_hashes else np.empty(0, dtype=np.uint64)
    found: set[int] = set()
    stream = TokenStream(shard_dir, split)
    chunk_tokens = max(chunk_tokens, 2 * n)
    start = 0
    while start < stream.num_tokens and len(wanted):
        # Chunks overlap by n - 1 tokens so that no n-gram is lost at a chunk edge.
        length = min(chunk_tokens, stream.num_tokens - start)
        hashes = ngram_hashes(stream.read(start, length), n)
        found.update(np.unique(hashes[np.isin(hashes, wanted)]).tolist())
        if start + length >= stream.num_tokens:
            break
        start += length - (n - 1)
    return [None if len(h) == 0 else bool(found.intersection(h.tolist())) for h in item_hashes]


def check_decontamination(cfg, config_path) -> None:
    if not cfg.train_files and not cfg.shard_dirs:
        raise ConfigError(f"{config_path}: decontamination: name train_files (text) or shard_dirs (token shards)")
    check_training_text(cfg, "decontamination", config_path)


def check_training_text(cfg, key: str, config_path) -> None:
    """``{key}.train_files`` (globs: each set must match a file) and ``{key}.shard_dirs`` (token shard
    folders with their tokenizer and ``shard_split``), as the decontamination and fairness sections name them."""
    from raylm.data.token_shards import read_index

    if cfg.train_files and not train_files(cfg):
        raise ConfigError(f"{config_path}: {key}.train_files: no file matches {cfg.train_files}")
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            index = read_index(folder)
            shard_tokenizer(folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{config_path}: {key}.shard_dirs.{i}: {e}") from None
        if cfg.shard_split not in index["splits"]:
            raise ConfigError(f"{config_path}: {key}.shard_split: {folder} has no split {cfg.shard_split!r}")


def shard_hits(items: list[str], cfg) -> list[bool | None]:
    """Token n-gram overlap with every shard folder; None where an item is shorter than n tokens."""
    from tokenizers import Tokenizer

    hits: list[bool | None] = [None] * len(items)
    for folder in cfg.shard_dirs:
        tokenizer = Tokenizer.from_file(str(shard_tokenizer(folder)))
        tokens = [e.ids for e in tokenizer.encode_batch(items, add_special_tokens=False)]
        for i, hit in enumerate(contaminated_items(tokens, folder, cfg.ngram, cfg.shard_split)):
            if hit is not None:
                hits[i] = bool(hits[i]) or hit
    return hits


def train_files(cfg) -> list[str]:
    return sorted({f for pattern in cfg.train_files for f in glob.glob(pattern, recursive=True)})


def iter_train_texts(cfg):
    """The text of every file of ``cfg.train_files`` (``cfg.text_field`` of .jsonl and .parquet lines)."""
    for file in train_files(cfg):
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches(columns=[cfg.text_field]):
                yield from batch.column(0).to_pylist()
        elif file.endswith(".jsonl"):
            with open(file, "rb") as f:
                for _, record in records(f, file):
                    yield record.get(cfg.text_field, "")
        else:
            yield Path(file).read_text(encoding="utf-8", errors="replace")


def decontamination_report(tasks: list[tuple], cfg) -> dict:
    items, where = [], []
    for ref, task in tasks:
        for doc in task.eval_docs:
            text = task.text(doc)
            if task.output_type != "loglikelihood_rolling":
                text += " " + task.target_text(doc)
            items.append(text)
            where.append((result_key(ref, task), doc.where()))
    hits = contaminated(items, iter_train_texts(cfg), cfg.ngram) if cfg.train_files else [False] * len(items)
    token_hits = shard_hits(items, cfg) if cfg.shard_dirs else [False] * len(items)
    report = {}
    for ref, task in tasks:
        key = result_key(ref, task)
        mine = [(w, hit, token_hit) for (name, w), hit, token_hit in zip(where, hits, token_hits) if name == key]
        flagged = [w for w, hit, token_hit in mine if hit or token_hit]
        n = len(task.eval_docs)
        report[key] = {"ngram": cfg.ngram, "n_items": n, "contaminated": len(flagged),
                       "fraction": len(flagged) / n, "examples": flagged[:10]}
        if cfg.shard_dirs:  # items shorter than n tokens cannot be tested against the shards
            report[key]["too_short_for_shards"] = sum(token_hit is None for _, _, token_hit in mine)
    return report
