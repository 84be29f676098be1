"""The data stages' logic on real text, without Ray: every filter at its thresholds' edges, PII
redaction, and MinHash LSH dedup recall/precision on planted and on the embedded corpus's real
near duplicates (through the same parquet -> bucket shard -> union-find path the pipeline runs)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.actors.data.connected_components import components_in_process
from raylm.actors.data.minhash_dedup import DedupConfig, MinHashSignatures, bucket_edges
from raylm.actors.data.c4_filter import C4Config, c4_filter
from raylm.actors.data.fineweb_filter import FineWebConfig, fineweb_filter
from raylm.actors.data.gopher_filters import GopherQualityConfig, GopherRepetitionConfig, gopher_quality, gopher_repetition
from raylm.actors.data.quality_filters import WORD_RE, DocumentFilter, FilterConfig
from raylm.actors.data.text_cleanup import NormalizeConfig, PIIConfig, normalize, redact_pii
from raylm.data.stdlib_corpus import build_embedded_corpus

pytestmark = pytest.mark.timeout(300)


def words_of(text):
    return WORD_RE.findall(text)


def sentence(i):
    return f"The parser reads token number {i} and hands it to the next stage of the compiler."


# ---------------------------------------------------------------- filters at their edges

def test_gopher_quality_edges():
    cfg = GopherQualityConfig(min_words=50, max_words=60)
    base = " ".join(["the cat sat with a dog and that was fine"] * 5)  # 50 words
    assert gopher_quality(base, words_of(base), cfg) is None
    short = base.rsplit(" ", 1)[0]
    assert gopher_quality(short, words_of(short), cfg) == "min_words"
    long = base + " x" * 11
    assert gopher_quality(long, words_of(long), cfg) == "max_words"
    cfg = GopherQualityConfig(min_words=1)
    assert gopher_quality("the with", ["the", "with"], GopherQualityConfig(min_words=1, min_mean_word_length=3.5)) is None
    assert gopher_quality("to of", ["to", "of"], GopherQualityConfig(min_words=1, min_mean_word_length=2.01)) == "min_mean_word_length"
    long_words = "the with " + "abcdefghijklmnopqrstuvwxyz " * 2
    assert gopher_quality(long_words, words_of(long_words), cfg) == "max_mean_word_length"
    # stop words: exactly min_stop_words passes, one fewer fails
    two = "the river flows with water past mountains"
    assert gopher_quality(two, words_of(two), cfg) is None
    one = "the river flows past mountains today"
    assert gopher_quality(one, words_of(one), cfg) == "stop_words"
    # symbols: 1 '#' per 10 words is the limit (0.1), 2 is over
    ten = "the river flows with water past many tall mountains today"
    assert gopher_quality(ten + " #", words_of(ten), cfg) is None
    assert gopher_quality(ten + " # #", words_of(ten), cfg) == "symbol_word_ratio"
    # ellipsis lines: 3 of 10 lines (0.3) pass, 4 fail
    lines = [f"the river {i} flows with water" for i in range(10)]
    ok = "\n".join(line + ("..." if i < 3 else "") for i, line in enumerate(lines))
    bad = "\n".join(line + ("..." if i < 4 else "") for i, line in enumerate(lines))
    assert gopher_quality(ok, words_of(ok), GopherQualityConfig(min_words=1, max_symbol_word_ratio=1)) is None
    assert gopher_quality(bad, words_of(bad), GopherQualityConfig(min_words=1, max_symbol_word_ratio=1)) == "ellipsis_lines_ratio"
    numbers = "the with 1 2 3 4 5 6 7 8"
    assert gopher_quality(numbers, numbers.split(), GopherQualityConfig(min_words=1, min_mean_word_length=0)) == "alpha_words_ratio"


def test_gopher_repetition_edges():
    cfg = GopherRepetitionConfig(max_top_ngram_chars_ratio={}, max_duplicate_ngram_chars_ratio={})
    lines = [sentence(i) for i in range(10)]
    text = "\n".join(lines[:7] + lines[:3])  # 3 duplicate lines of 10 = 0.3: the limit
    assert gopher_repetition(text, words_of(text), cfg.model_copy(update={"max_duplicate_line_chars_ratio": 1})) is None
    text = "\n".join(lines[:6] + lines[:4])
    assert gopher_repetition(text, words_of(text), cfg.model_copy(update={"max_duplicate_line_chars_ratio": 1})) == "duplicate_lines_ratio"
    distinct = " ".join(f"w{i}" for i in range(100))
    assert gopher_repetition(distinct, words_of(distinct), GopherRepetitionConfig()) is None
    repeated = distinct + " " + " ".join(words_of(distinct)[:30])
    assert gopher_repetition(repeated, words_of(repeated), GopherRepetitionConfig()) == "duplicate_5_gram_ratio"
    # the reference's top n-gram: its words joined by spaces, times its count, over len(text)
    top = " ".join(["alpha beta"] * 7 + [f"w{i}" for i in range(60)])  # 70 / 306 chars
    assert gopher_repetition(top, words_of(top), GopherRepetitionConfig()) == "top_2_gram_ratio"
    top = " ".join(["alpha beta"] * 5 + [f"w{i}" for i in range(60)])  # over the words' characters: 50 / 219
    assert gopher_repetition(top, words_of(top), GopherRepetitionConfig(rule="raylm")) == "top_2_gram_ratio"


def test_c4_line_and_document_rules():
    cfg = C4Config(min_sentences=3)
    text = "\n".join([sentence(1), "no terminal punctuation here", "Too short.", "Enable JavaScript to view it.",
                      sentence(2), sentence(3)])
    kept, reason = c4_filter(text, cfg)
    assert reason is None and kept == "\n".join([sentence(1), sentence(2), sentence(3)])
    assert c4_filter("\n".join([sentence(1), sentence(2)]), cfg)[1] == "min_sentences"
    assert c4_filter("Lorem ipsum dolor sit amet. " * 5, cfg)[1] == "lorem_ipsum"
    assert c4_filter(sentence(1) + " {x}.", cfg)[1] == "curly_bracket"
    assert c4_filter("none of these lines\nend in punctuation", cfg)[1] == "no_lines_left"


def test_fineweb_rules():
    cfg = FineWebConfig()
    good = "\n".join(sentence(i) for i in range(10))
    assert fineweb_filter(good, words_of(good), cfg) is None
    # 12% of lines ending in punctuation is the limit: 3 of 25 = 0.12 passes, 2 of 25 fails
    lines = [f"a line of text number {i} that runs on and on" for i in range(25)]
    ok = "\n".join(line + ("." if i < 3 else "") for i, line in enumerate(lines))
    bad = "\n".join(line + ("." if i < 2 else "") for i, line in enumerate(lines))
    assert fineweb_filter(ok, words_of(ok), cfg) is None
    assert fineweb_filter(bad, words_of(bad), cfg) == "line_punctuation_ratio"
    short = "\n".join(["Yes."] * 1 + [f"Item {i}." for i in range(9)] + [sentence(0)])
    assert fineweb_filter(short, words_of(short), cfg) == "short_line_ratio"
    dup = "\n".join([sentence(0)] * 2 + [sentence(i) for i in range(1, 6)])
    assert fineweb_filter(dup, words_of(dup), cfg) == "duplicate_line_chars_ratio"


def test_normalize_and_pii():
    assert normalize("Cafe\u0301  au\t lait \r\n\n\n\n  next  ", NormalizeConfig()) == "Café au lait\n\nnext"
    text = ("Mail guido@python.org or a.b-c@mail.example.co.uk; call +1 555-123-4567 or (020) 7946 0958; "
            "server 192.168.0.1 and 10.0.0.255. Not PII: version 3.11.7, 999.1.1.1, 1.2.3.4.5, 2024-01-02, x@y.")
    redacted, counts = redact_pii(text, PIIConfig())
    assert counts == Counter(email=2, phone=2, ip_address=2)
    for token in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>"):
        assert token in redacted
    for kept in ("3.11.7", "999.1.1.1", "1.2.3.4.5", "2024-01-02", "x@y."):
        assert kept in redacted
    assert redact_pii(text, PIIConfig(email=False, phone=False, ip_address=False))[0] == text


def test_document_filter_reports_reasons_and_keeps_bad_input_rows():
    cfg = FilterConfig(c4=C4Config(min_sentences=1), bad_words={"words": ["darn"]},
                       gopher_quality=GopherQualityConfig(min_words=10))
    good = ("The scheduler keeps a queue of ready tasks and wakes one whenever a worker is idle.\n"
            "Each task records when it started, so that slow ones can be reported at the end of the run.\n"
            "Questions about this module go to the maintainers. Write to ops@example.com.")
    batch = pa.table({"key": [1, 2, 3, 4], "text": [good, "This is far too short.", good + " Darn it.", "raw"],
                      "reason": ["", "", "", "quarantine:malformed_json"]})
    out = DocumentFilter(cfg)(batch)
    assert out.column("reason").to_pylist() == ["", "gopher_quality:min_words", "bad_words", "quarantine:malformed_json"]
    texts = out.column("text").to_pylist()
    assert "<EMAIL>" in texts[0] and texts[1] == "" and texts[3] == "raw"
    assert out.column("pii_email").to_pylist() == [1, 0, 0, 0]
    # the word list switched off keeps the document that contains one of its words
    off = FilterConfig(c4=C4Config(min_sentences=1), bad_words={"words": ["darn"], "enabled": False},
                       gopher_quality=GopherQualityConfig(min_words=10))
    assert DocumentFilter(off)(batch).column("reason").to_pylist()[2] == ""


# ---------------------------------------------------------------- dedup

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = build_embedded_corpus(tmp_path_factory.mktemp("corpus"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_dedup(tmp_path, texts, cfg, keys=None):
    """The pipeline's dedup path: signature rows -> parquet -> bucket shards -> clusters."""
    keys = list(range(len(texts))) if keys is None else keys
    table = pa.table({"key": pa.array(keys, pa.int64()), "text": texts, "reason": [""] * len(texts)})
    table = MinHashSignatures(cfg)(table)
    path = tmp_path / f"sig-{len(list(tmp_path.glob('sig-*')))}.parquet"
    pq.write_table(table, path)
    results = [bucket_edges([str(path)], shard, cfg) for shard in range(cfg.bucket_shards)]
    removed, stats = components_in_process(results, cfg.bucket_shards)
    return set(removed.tolist()), stats, np.concatenate([r["near"] for r in results])


def edit_words(text, fraction, rng, vocabulary):
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def jaccard(a, b, n=5):
    def grams(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_minhash_recall_precision_on_planted_near_duplicates(corpus, tmp_path):
    cfg = DedupConfig(bucket_shards=3)
    rng = random.Random(0)
    originals = [d["text"] for d in corpus if 150 <= len(d["text"].split()) <= 600]
    originals = list(dict.fromkeys(originals))
    removed, _, _ = run_dedup(tmp_path, originals, cfg)  # drop the corpus's own duplicates first
    originals = [t for i, t in enumerate(originals) if i not in removed][:240]
    vocabulary = sorted({w for t in originals for w in t.split()})
    rates = [0.01, 0.02, 0.05, 0.10]
    texts, planted = list(originals), {}
    for r, rate in enumerate(rates):
        for i in range(r * 60, (r + 1) * 60):
            planted[len(texts)] = (i, rate)
            texts.append(edit_words(originals[i], rate, rng, vocabulary))
    removed, stats, _ = run_dedup(tmp_path, texts, cfg)
    recall = {rate: sum(k in removed for k, (_, r) in planted.items() if r == rate) / 60 for rate in rates}
    precision = len(removed & set(planted)) / max(1, len(removed))
    print(f"planted near-duplicates: recall by edit rate {recall}, precision {precision:.3f}, {stats}")
    assert precision == 1.0  # nothing but planted copies removed; the originals (smaller keys) kept
    assert recall[0.01] >= 0.9
    # 14 bands x 8 rows put the LSH threshold near 5-gram Jaccard 0.72, so 5% edits (J ~ 0.6) are
    # caught sometimes and 10% (J ~ 0.4) rarely. Recall must follow LSH's S-curve
    # P(J) = 1 - (1 - J^rows)^bands at each pair's true Jaccard, within sampling noise: more would
    # mean correlated hash functions, less a broken signature.
    for rate in rates:
        pairs = [(originals[i], texts[k]) for k, (i, r) in planted.items() if r == rate]
        expected = np.mean([1 - (1 - jaccard(a, b) ** cfg.rows_per_band) ** cfg.bands for a, b in pairs])
        assert abs(recall[rate] - expected) <= 0.15, (rate, recall[rate], expected)
    assert recall[0.01] >= recall[0.02] >= recall[0.05] >= recall[0.10]
    assert recall[0.10] <= 0.2


def test_jaccard_check_and_exact_dedup_on_real_corpus_duplicates(corpus, tmp_path):
    texts = [d["text"] for d in corpus]
    removed, stats, near = run_dedup(tmp_path, texts, DedupConfig(bucket_shards=2))
    counts = Counter(texts)
    assert stats["exact_duplicates_removed"] == sum(n - 1 for n in counts.values())
    copies: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        copies.setdefault(t, []).append(i)
    # every later copy goes; the first stays unless its whole cluster has an even earlier member
    assert all(k in removed for group in copies.values() for k in group[1:])
    assert stats["near_duplicates_removed"] >= 50  # the stdlib's real near duplicates
    assert sum(stats["cluster_sizes"].values()) == stats["clusters"]
    # precision on the real ones, by true 5-gram Jaccard: LSH alone links a few pairs below 0.5...
    similar = np.array([jaccard(texts[a], texts[b]) for a, b in near.tolist()])
    print(f"real corpus: {stats}; candidate links with true Jaccard >= 0.5: {np.mean(similar >= 0.5):.3f}")
    assert np.mean(similar >= 0.5) >= 0.95
    # ...which the Jaccard check (estimated from the full signatures) removes; it never adds links
    checked, checked_stats, checked_near = run_dedup(tmp_path, texts, DedupConfig(bucket_shards=2, jaccard_threshold=0.8))
    assert checked <= removed and len(checked_near) < len(near)
    checked_similar = np.array([jaccard(texts[a], texts[b]) for a, b in checked_near.tolist()])
    print(f"with jaccard_threshold 0.8: {checked_stats}; true Jaccard >= 0.5: {np.mean(checked_similar >= 0.5):.3f}")
    assert np.mean(checked_similar >= 0.5) == 1.0


class UnionFind:
    """The single-process reference the sharded clustering is checked against."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        while self.parent.setdefault(x, x) != x:
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)


def test_clusters_keep_smallest_key_and_count_exact_first():
    links = [{"exact": np.array([[5, 9]]), "near": np.zeros((0, 2), np.int64)},
             {"exact": np.zeros((0, 2), np.int64), "near": np.array([[2, 9], [7, 8]])}]
    removed, stats = components_in_process(links, 3)
    assert removed.tolist() == [5, 8, 9]
    assert stats["exact_duplicates_removed"] == 1 and stats["near_duplicates_removed"] == 2
    assert stats["cluster_sizes"] == {"2": 1, "3": 1} and stats["largest_cluster"] == 3


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_sharded_clusters_equal_union_find_on_hard_graphs(parts):
    """Long chains in both key orders, stars, a grid and random links: the slowest shapes for
    rewriting into stars. Same clusters as a union-find, and the rounds stay O(log^2 n)."""
    rng = np.random.default_rng(parts)
    n = 4000
    chain = np.arange(1000, 1600)
    shuffled = rng.permutation(np.arange(2000, 2600))
    grid = np.arange(3000, 3400).reshape(20, 20)
    edges = np.concatenate([
        np.stack([chain[:-1], chain[1:]], 1),
        np.stack([shuffled[:-1], shuffled[1:]], 1),
        np.stack([np.full(100, 700), np.arange(800, 900)], 1),
        np.stack([grid[:, :-1].ravel(), grid[:, 1:].ravel()], 1),
        np.stack([grid[:-1].ravel(), grid[1:].ravel()], 1),
        rng.integers(0, n, (300, 2)),
    ])
    rng.shuffle(edges)
    pieces = np.array_split(edges, 3)
    links = [{"exact": np.zeros((0, 2), np.int64), "near": piece} for piece in pieces]
    removed, stats = components_in_process(links, parts)
    uf = UnionFind()
    for a, b in edges.tolist():
        uf.union(a, b)
    expected = sorted(k for k in uf.parent if uf.find(k) != k)
    assert removed.tolist() == expected
    sizes = Counter(Counter(uf.find(k) for k in uf.parent).values())
    assert stats["cluster_sizes"] == {str(s): c for s, c in sorted(sizes.items())}
    assert stats["component_rounds"] <= 4 * int(np.log2(n)) ** 2


def test_sharded_clusters_as_ray_tasks_equal_in_process():
    import ray

    from raylm.actors.data.connected_components import duplicate_clusters, ray_runner

    rng = np.random.default_rng(0)
    links = [{"exact": np.zeros((0, 2), np.int64), "near": rng.integers(0, 500, (200, 2))} for _ in range(3)]
    expected, expected_stats = components_in_process(links, 4)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        submit, fetch = ray_runner()
        removed, stats = duplicate_clusters([ray.put(x) for x in links], 4, submit, fetch)
    finally:
        ray.shutdown()
    assert removed.tolist() == expected.tolist() and stats == expected_stats


def test_document_filter_runs_language_id_when_enabled():
    english = ("The scheduler keeps a queue of ready tasks and wakes one whenever a worker is idle, "
               "and each task records when it started so that the slow ones can be reported.")
    french = ("Le planificateur garde une file de tâches prêtes et en réveille une dès qu'un travailleur "
              "est libre, et chaque tâche note l'heure de son début pour signaler les plus lentes.")
    # English stop words would drop the French text first: the Gopher stop-word rule is relaxed here
    cfg = FilterConfig(c4=C4Config(min_sentences=1), gopher_quality=GopherQualityConfig(min_words=10, min_stop_words=0),
                       language_id={"enabled": True})
    out = DocumentFilter(cfg)(pa.table({"key": [1, 2], "text": [english, french], "reason": ["", ""]}))
    assert out.column("reason").to_pylist() == ["", "language:fr"]
    off = FilterConfig(c4=C4Config(min_sentences=1), gopher_quality=GopherQualityConfig(min_words=10, min_stop_words=0))
    assert DocumentFilter(off).filter_one(french)[1] == ""  # off by default
