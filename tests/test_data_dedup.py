"""Near-duplicate removal measured: recall and precision of MinHash LSH (actors/data/minhash_dedup.py) on
planted near duplicates (1-10% of words edited) and on the real duplicates of the embedded corpus,
against ground truth computed exactly (true 5-gram Jaccard, prefix-filtered all-pairs search)."""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.actors.data.connected_components import components_in_process
from raylm.actors.data.minhash_dedup import DedupConfig, MinHashSignatures, bucket_edges
from raylm.data.stdlib_corpus import build_embedded_corpus

pytestmark = pytest.mark.timeout(600)
WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def run_dedup(tmp_path, texts: list[str], cfg: DedupConfig) -> tuple[set[int], dict]:
    """The production path: signatures (map_batches body) -> parquet -> per-shard bucket edges -> clusters.
    Keys are list positions; returns (removed positions, stats)."""
    table = pa.table({"key": pa.array(range(len(texts)), pa.int64()), "text": texts, "reason": [""] * len(texts)})
    signed = MinHashSignatures(cfg)(table)
    path = tmp_path / "signed.parquet"
    pq.write_table(signed, path)
    shards = [bucket_edges([str(path)], shard, cfg) for shard in range(cfg.bucket_shards)]
    removed, stats = components_in_process(shards, cfg.bucket_shards)
    return set(removed.tolist()), stats


def lsh_probability(s: float, bands: int, rows: int) -> float:
    return 1 - (1 - s**rows) ** bands


def edit_words(text: str, fraction: float, rng: random.Random, vocabulary: list[str]) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = build_embedded_corpus(tmp_path_factory.mktemp("corpus"))
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_planted_near_duplicates_recall_follows_the_lsh_curve(corpus, tmp_path):
    rng = random.Random(0)
    unique = list(dict.fromkeys(t for t in corpus if len(t.split()) >= 120))
    originals, original_shingles = [], []
    for text in rng.sample(unique, 400):  # distinct documents: no real near duplicates among them
        sh = shingles(text)
        if all(jaccard(sh, o) < 0.2 for o in original_shingles):
            originals.append(text)
            original_shingles.append(sh)
        if len(originals) == 240:
            break
    vocabulary = sorted({w for t in originals for w in t.split()})
    fractions = [0.01, 0.02, 0.03, 0.05, 0.10]
    planted = [(i, f, edit_words(originals[i], f, rng, vocabulary)) for i in range(len(originals)) for f in [fractions[i % 5]]]
    texts = originals + [p[2] for p in planted]
    cfg = DedupConfig()  # FineWeb: 5-grams, 14 bands x 8 rows
    removed, stats = run_dedup(tmp_path, texts, cfg)
    n = len(originals)
    # every original is kept (it comes first), so every removal of an original is a false positive
    false_positives = [k for k in removed if k < n]
    by_fraction = defaultdict(list)
    expected, found = 0.0, 0
    for j, (i, fraction, copy) in enumerate(planted):
        s = jaccard(original_shingles[i], shingles(copy))
        p = lsh_probability(s, cfg.bands, cfg.rows_per_band)
        hit = (n + j) in removed
        by_fraction[fraction].append(hit)
        expected += p
        found += hit
    recall = {f: sum(h) / len(h) for f, h in sorted(by_fraction.items())}
    print("recall by fraction of words edited:", recall, "expected hits", round(expected, 1), "found", found)
    # precision: nothing that is not a planted copy is removed (originals are distinct documents)
    assert false_positives == [] or len(false_positives) / max(len(removed), 1) < 0.02
    assert recall[0.01] >= 0.95 and recall[0.02] >= 0.85
    assert recall[0.01] >= recall[0.03] >= recall[0.10]
    # MinHash LSH is a probabilistic test with a known S-curve: hits must match its prediction
    sigma = math.sqrt(max(expected, 1.0))
    assert abs(found - expected) <= 4 * sigma + 3, (found, expected)
    assert stats["near_duplicates_removed"] == len(removed)


def real_near_duplicate_pairs(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    """All pairs with 5-gram Jaccard >= threshold, exactly: a pair that similar must share one of the
    first |A| - ceil(threshold * |A|) + 1 shingles of each set in a global rarest-first order
    (prefix filtering), so only those are indexed and only candidates are compared."""
    sets = [shingles(t) for t in texts]
    frequency = defaultdict(int)
    for s in sets:
        for g in s:
            frequency[g] += 1
    index = defaultdict(list)
    candidates = set()
    for i, s in enumerate(sets):
        ordered = sorted(s, key=lambda g: (frequency[g], g))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        for g in prefix:
            for j in index[g]:
                candidates.add((j, i))
            index[g].append(i)
    return {(i, j) for i, j in candidates if texts[i] != texts[j] and jaccard(sets[i], sets[j]) >= threshold}


def test_real_duplicates_of_the_embedded_corpus(corpus, tmp_path):
    texts = corpus
    cfg = DedupConfig()
    removed, stats = run_dedup(tmp_path, texts, cfg)
    # exact: every repeated text keeps exactly its first copy
    first = {}
    exact_truth = set()
    for i, t in enumerate(texts):
        if t in first:
            exact_truth.add(i)
        else:
            first[t] = i
    assert exact_truth <= removed and stats["exact_duplicates_removed"] == len(exact_truth)
    # near: ground-truth pairs with Jaccard >= 0.8 that are not identical
    truth = real_near_duplicate_pairs(texts, 0.8)
    assert len(truth) >= 20, "the embedded corpus must contain real near duplicates"
    caught = sum((j in removed) or (i in removed) for i, j in truth)
    recall = caught / len(truth)
    # precision: each near-duplicate removal has a kept or removed partner it truly resembles
    sets = {}
    near_removed = sorted(removed - exact_truth)
    close = 0
    for k in near_removed:
        sk = sets.setdefault(k, shingles(texts[k]))
        best = max(jaccard(sk, sets.setdefault(o, shingles(texts[o]))) for o in _partners(k, texts, cfg, tmp_path))
        close += best >= 0.5
    precision = close / max(len(near_removed), 1)
    print(f"embedded corpus: {len(truth)} true pairs >= 0.8, recall {recall:.3f}, "
          f"{len(near_removed)} near removals, precision {precision:.3f}, clusters {stats['cluster_sizes']}")
    assert recall >= 0.9
    assert precision >= 0.95


_BANDS_CACHE: dict = {}


def _partners(key: int, texts, cfg, tmp_path) -> list[int]:
    """Documents sharing an LSH band with ``key`` (the candidates that could have removed it)."""
    if "bands" not in _BANDS_CACHE:
        table = pa.table({"key": pa.array(range(len(texts)), pa.int64()), "text": texts, "reason": [""] * len(texts)})
        bands = MinHashSignatures(cfg)(table).column("bands").to_pylist()
        buckets = defaultdict(list)
        for k, bs in enumerate(bands):
            for b in bs:
                buckets[b].append(k)
        _BANDS_CACHE["bands"], _BANDS_CACHE["buckets"] = bands, buckets
    bands, buckets = _BANDS_CACHE["bands"], _BANDS_CACHE["buckets"]
    return sorted({o for b in bands[key] for o in buckets[b] if o != key and texts[o] != texts[key]}) or [key]
