"""Exact and near-duplicate removal: MinHash signatures over word n-gram shingles, LSH banding,
candidate pairs sharded by bucket, union-find into clusters, one document kept per cluster.

Three steps, each bounded in memory:
1. ``add_signatures`` (a ``map_batches`` stage): per document an exact-text hash and one hash per
   LSH band (``bands x rows`` MinHash values; FineWeb's 5-grams, 14 x 8 by default).
2. ``bucket_edges`` (one task per bucket shard): a shard sees only the (band, bucket hash) entries
   whose hash falls in it, groups them and links every member of a bucket to the bucket's smallest
   key. With ``jaccard_threshold`` set, a link is kept only when the two full signatures agree on at
   least that fraction of values (the estimated Jaccard similarity), which removes LSH false positives.
3. ``connected_components.duplicate_clusters``: the clusters of the links, computed in rounds of
   tasks over node partitions (no process holds the whole graph); in each cluster the smallest key
   (the earliest document of the earliest input file) is kept, the rest removed. Only counts and,
   at the end, the keys to remove reach the driver.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from raylm.config import Section

MERSENNE_61 = np.uint64((1 << 61) - 1)
TOKEN_RE = re.compile(r"\w+")


class DedupConfig(Section):
    exact: bool = True  # remove documents whose text is identical to an earlier one
    near: bool = True  # remove near-duplicates found by MinHash LSH (one kept per cluster)
    ngram: int = Field(default=5, ge=1)  # words per shingle (lower-cased \w+ words)
    bands: int = Field(default=14, ge=1)  # LSH bands; documents sharing any band's hash are candidates
    rows_per_band: int = Field(default=8, ge=1)  # MinHash values per band (bands x rows_per_band in all)
    jaccard_threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # None: trust LSH candidates
    bucket_shards: int = Field(default=4, ge=1)  # tasks the candidate grouping and the clustering are split over
    seed: int = 1  # seeds the MinHash permutations

    @model_validator(mode="after")
    def _check(self):
        if not (self.exact or self.near) and self.jaccard_threshold is not None:
            raise ValueError("jaccard_threshold: only used by near dedup (near: true)")
        return self


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    n = cfg.bands * cfg.rows_per_band
    # a and b span the whole field: with a small a, a * h would wrap mod p only a few times and
    # h -> (a * h + b) mod p would be nearly monotone, so every "permutation" would pick the same
    # minimum. a * h wraps mod 2**64 in uint64 (as datatrove's does); mod p then mixes further.
    a = rng.integers(1, int(MERSENNE_61), n, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE_61), n, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the distinct word n-grams of the lower-cased text."""
    words = np.array([zlib.crc32(w.encode()) for w in TOKEN_RE.findall(text.lower())], dtype=np.uint64)
    if len(words) == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(ngram, len(words))
    h = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for j in range(n):  # polynomial rolling combination, wrapping mod 2**64
        h = h * np.uint64(1_000_003) + words[j:len(words) - n + 1 + j]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return np.unique(h & np.uint64(0xFFFFFFFF))


def minhash_signature(text: str, cfg: DedupConfig, perms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    a, b = perms if perms is not None else _permutations(cfg)
    shingles = shingle_hashes(text, cfg.ngram)
    values = (shingles[:, None] * a[None, :] + b[None, :]) % MERSENNE_61
    return (values.min(axis=0) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def band_hashes(signature: np.ndarray, cfg: DedupConfig) -> list[int]:
    rows = signature.reshape(cfg.bands, cfg.rows_per_band)
    return [int.from_bytes(hashlib.blake2b(r.tobytes() + bytes([i]), digest_size=8).digest(), "little", signed=True)
            for i, r in enumerate(rows)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class MinHashSignatures:
    """``map_batches`` body: adds ``exact_hash``, ``bands`` and (for the Jaccard check) ``signature``
    to the kept rows of a batch; dropped rows get empty values."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.perms = _permutations(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, reasons = batch.column("text").to_pylist(), batch.column("reason").to_pylist()
        exact, bands, signatures = [], [], []
        for text, reason in zip(texts, reasons):
            if reason:
                exact.append(0)
                bands.append([])
                signatures.append(b"")
                continue
            exact.append(exact_hash(text))
            if self.cfg.near:
                signature = minhash_signature(text, self.cfg, self.perms)
                bands.append(band_hashes(signature, self.cfg))
                signatures.append(signature.tobytes() if self.cfg.jaccard_threshold is not None else b"")
            else:
                bands.append([])
                signatures.append(b"")
        batch = batch.append_column("exact_hash", pa.array(exact, pa.int64()))
        batch = batch.append_column("bands", pa.array(bands, pa.list_(pa.int64())))
        return batch.append_column("signature", pa.array(signatures, pa.binary()))


def bucket_edges(files: list[str], shard: int, cfg: DedupConfig, excluded_files=()) -> dict[str, np.ndarray]:
    """The links (kept key, duplicate key) of one bucket shard, exact and near kept apart. Rows of
    ``excluded_files`` (file indices quarantined whole) take no part: a discarded copy must never be
    the one a cluster keeps."""
    from raylm.actors.data.document_reader import RECORD_BITS

    keys, exact, bands, sigs = [], [], [], []
    excluded = np.asarray(list(excluded_files), dtype=np.int64)
    for path in files:
        columns = ["key", "reason", "exact_hash", "bands"] + (["signature"] if cfg.jaccard_threshold is not None else [])
        table = pq.read_table(path, columns=columns)
        kept = pc.equal(table.column("reason"), "")
        table = table.filter(kept)
        if len(excluded):
            table = table.filter(pa.array(~np.isin(table.column("key").to_numpy() >> RECORD_BITS, excluded)))
        k = table.column("key").to_numpy()
        e = table.column("exact_hash").to_numpy()
        mine = (e.view(np.uint64) % np.uint64(cfg.bucket_shards)) == shard
        keys.append(k)
        exact.append(np.where(mine, e, 0))
        if cfg.near:
            band_matrix = np.asarray(table.column("bands").to_pylist(), dtype=np.int64).reshape(len(k), cfg.bands)
            band_matrix = np.where((band_matrix.view(np.uint64) % np.uint64(cfg.bucket_shards)) == shard, band_matrix, 0)
            bands.append(band_matrix)
            if cfg.jaccard_threshold is not None:
                sigs += [np.frombuffer(s, dtype=np.uint32) for s in table.column("signature").to_pylist()]
    keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    exact = np.concatenate(exact) if exact else np.zeros(0, np.int64)
    out = {"exact": _group_links(keys, exact, None, None) if cfg.exact else np.zeros((0, 2), np.int64)}
    if cfg.near and len(keys):
        band_matrix = np.concatenate(bands)
        links = [_group_links(keys, band_matrix[:, i], sigs, cfg.jaccard_threshold) for i in range(cfg.bands)]
        out["near"] = np.unique(np.concatenate(links), axis=0) if links else np.zeros((0, 2), np.int64)
    else:
        out["near"] = np.zeros((0, 2), np.int64)
    return out


def _group_links(keys: np.ndarray, hashes: np.ndarray, sigs, threshold) -> np.ndarray:
    """Link each row to the smallest key with the same (nonzero) hash. 0 marks "not in this shard"."""
    rows = np.nonzero(hashes != 0)[0]
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    order = rows[np.lexsort((keys[rows], hashes[rows]))]
    h = hashes[order]
    starts = np.r_[True, h[1:] != h[:-1]]
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    dup = ~starts
    first, other = group_first[dup], order[dup]
    if threshold is not None and len(first):
        ok = np.array([estimated_jaccard(sigs[i], sigs[j]) >= threshold for i, j in zip(first, other)], dtype=bool)
        first, other = first[ok], other[ok]
    return np.stack([keys[first], keys[other]], axis=1)
