"""The tokenization stage: an actor pool, each actor loading the tokenizer once, encoding batches
with ``Tokenizer.encode_batch_fast`` (Rust, parallel; no character offsets) and writing each batch's documents as token shards.

Every batch becomes at most one shard per split, named after the batch's smallest document key, so
the driver can order the index by key: the token stream is the same whatever the actors' timing.
Beside the shards, ``documents/<prefix>.parquet`` lists the batch's documents in shard order (key,
id, source, split, copies, tokens with EOS): what exactly the shards hold, document by document.
A document goes to the validation split when a hash of its key falls below ``validation_fraction``;
training documents are repeated per their source's mixing weight (2.5 -> twice, and a third time
for half of them, chosen by a hash of the key), validation documents never.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa

from raylm.data.token_shards import TokenShardWriter


def unit_hash(key: int, salt: str) -> float:
    """A uniform number in [0, 1) from a document key: deterministic "randomness" per document."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def copies(key: int, weight: float, seed: int) -> int:
    whole = int(weight)
    return whole + (unit_hash(key, f"mix{seed}") < weight - whole)


class ShardTokenizer:
    def __init__(self, tokenizer_file: str, shard_dir: str, vocab_size: int, eos_token_id: int,
                 validation_fraction: float, source_weights: dict[str, float], seed: int):
        from raylm.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_file)
        # a document's own "<|eos|>" (or "<|user|>") is text, not a special id: one EOS per document
        self.tokenizer.encode_special_tokens = True
        self.shard_dir, self.vocab_size, self.eos = shard_dir, vocab_size, eos_token_id
        self.validation_fraction, self.weights, self.seed = validation_fraction, source_weights, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        keys = batch.column("key").to_numpy()
        sources = batch.column("source").to_pylist()
        encodings = self.tokenizer.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=False)
        order = np.argsort(keys, kind="stable")
        prefix = f"{int(keys[order[0]]):016x}-" if len(keys) else "empty-"
        writers = {split: TokenShardWriter(self.shard_dir, split, self.vocab_size, self.eos, prefix=prefix,
                                           shard_tokens=1 << 62) for split in ("train", "validation")}
        rows = {"split": [], "file": [], "tokens": [], "documents": [], "first_key": [], "source_tokens": [],
                "started": [], "finished": []}
        source_tokens: dict[str, dict[str, int]] = {"train": {}, "validation": {}}
        ids_column = batch.column("id").to_pylist() if "id" in batch.column_names else [""] * len(keys)
        manifest = {"key": [], "id": [], "source": [], "split": [], "copies": [], "tokens": []}
        for i in order:
            key, ids = int(keys[i]), encodings[i].ids
            if unit_hash(key, f"split{self.seed}") < self.validation_fraction:
                split, n = "validation", 1
            else:
                split, n = "train", copies(key, self.weights.get(sources[i], 1.0), self.seed)
            for _ in range(n):
                writers[split].add(ids)
            for name, value in zip(manifest, (key, ids_column[i], sources[i], split, n, len(ids) + 1)):
                manifest[name].append(value)
            per_source = source_tokens[split]
            per_source[sources[i]] = per_source.get(sources[i], 0) + n * (len(ids) + 1)
        if len(keys):
            self._write_manifest(manifest, prefix)
        for split, writer in writers.items():
            for entry in writer.close():
                rows["split"].append(split)
                rows["file"].append(entry["file"])
                rows["tokens"].append(entry["tokens"])
                rows["documents"].append(entry["documents"])
                rows["first_key"].append(int(keys[order[0]]))
                rows["source_tokens"].append(json.dumps(source_tokens[split]))
        rows["started"] = [started] * len(rows["split"])  # wall clock of this call, for the stage's busy span
        rows["finished"] = [time.time()] * len(rows["split"])
        return pa.table(rows)

    def _write_manifest(self, manifest: dict, prefix: str) -> None:
        import os

        import pyarrow.parquet as pq

        folder = os.path.join(self.shard_dir, "documents")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, prefix.rstrip("-") + ".parquet")
        pq.write_table(pa.table(manifest), path + ".tmp")
        os.replace(path + ".tmp", path)  # never a half manifest under the final name
