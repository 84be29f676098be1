"""Documents/s of `raylm data` against datatrove running the same steps on the same corpus and cores.

Steps on both sides: read JSONL -> Gopher quality filter (same thresholds, and by default the same
counting: raylm follows the reference's word tokens and stop-word rule) -> MinHash near-dedup
(5-grams, 14 bands x 8 rows: signatures, buckets, clusters, filter) -> tokenization with the same
tokenizer.json (EOS appended) into token files. raylm additionally does what it always does (exact
dedup, quarantine accounting, train/validation split, stats); datatrove runs 2 workers for 2 cores.

Equal work is checked, not assumed: both sides count the documents the Gopher filter keeps and the
documents they tokenize, and the script fails when the tokenized counts differ by more than LSH
noise (``--tolerance``, a fraction of the kept documents). A ratio over different work is no result.

Also: raylm's tokenization stage alone (its actors' busy span: encoding, split, shard writing)
against raw ``Tokenizer.encode_batch_fast`` on the same texts, and the whole tokens phase.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/data_pipeline.py --copies 4 --cpus 2

The corpus is the embedded stdlib corpus repeated ``--copies`` times, every copy after the first with
~2% of its words changed (so the near-dedup stage has real work), written once as JSONL.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOPHER = dict(min_doc_words=50, max_doc_words=100_000, min_avg_word_length=3, max_avg_word_length=10,
              max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
              max_non_alpha_words_ratio=0.8, min_stop_words=2)


def build_corpus(work: Path, copies: int) -> tuple[Path, int]:
    from raylm.data.stdlib_corpus import build_embedded_corpus

    base = [json.loads(line) for line in build_embedded_corpus(work / "stdlib").read_text().splitlines()]
    rng = random.Random(0)
    out = work / "input" / "corpus.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for copy in range(copies):
            for doc in base:
                text = doc["text"]
                if copy:
                    words = text.split(" ")
                    for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
                        words[i] = rng.choice(words)
                    text = " ".join(words)
                f.write(json.dumps({"id": f"{doc['id']}#{copy}", "text": text, "source": doc["source"]}) + "\n")
                n += 1
    return out, n


def train_bench_tokenizer(corpus: Path, work: Path) -> Path:
    from raylm.data.tokenizer import train_tokenizer

    texts = (json.loads(line)["text"] for line in corpus.open())
    path = work / "tokenizer.json"
    train_tokenizer(texts, 4096, path)
    return path


class CountDocuments:
    """A datatrove pipeline step (a callable) that counts the documents passing through it into a file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        n = 0
        for doc in data:
            n += 1
            yield doc
        self.path.write_text(str(n))


def run_datatrove(corpus: Path, tokenizer: Path, work: Path, cpus: int) -> tuple[float, dict]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    root = work / "datatrove"
    shutil.rmtree(root, ignore_errors=True)
    from datatrove.utils.hashing import HashConfig

    # sha1: datatrove 0.10's xxhash path passes str to xxhash 4, which refuses it (TypeError)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1", precision=64))
    reader = lambda: JsonlReader(str(corpus.parent), glob_pattern="*.jsonl")  # noqa: E731
    # logging_dir=None would make datatrove write logs/<timestamp>/ into the current directory
    common = dict(logging_dir=str(root / "datatrove_logs"), skip_completed=False)
    start = time.perf_counter()
    LocalPipelineExecutor([reader(), GopherQualityFilter(**GOPHER), MinhashDedupSignature(str(root / "sigs"), config=config)],
                          tasks=1, workers=1, **common).run()  # one input file: datatrove reads a file in one task
    LocalPipelineExecutor([MinhashDedupBuckets(str(root / "sigs"), str(root / "buckets"), config=config)],
                          tasks=config.num_buckets, workers=cpus, **common).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(root / "buckets"), str(root / "remove"), config=config)],
                          tasks=1, workers=1, **common).run()
    counts = {"after_filters": root / "after_filters.count", "tokenized": root / "tokenized.count"}
    LocalPipelineExecutor([reader(), GopherQualityFilter(**GOPHER), CountDocuments(counts["after_filters"]),
                           MinhashDedupFilter(str(root / "remove")), CountDocuments(counts["tokenized"]),
                           DocumentTokenizer(str(root / "tokens"), tokenizer_name_or_path=str(tokenizer), eos_token="<|eos|>")],
                          tasks=1, workers=1, **common).run()
    seconds = time.perf_counter() - start  # the counting steps are a loop over documents each: noise
    return seconds, {name: int(path.read_text()) for name, path in counts.items()}


def raylm_config(corpus: Path, tokenizer: Path, out: Path, cpus: int) -> Path:
    """The `raylm data` config doing the same steps: only the Gopher quality filter, same MinHash."""
    config = {
        "output_dir": str(out),
        "ray": {"num_cpus": cpus},
        "inputs": [{"path": str(corpus)}],
        "filters": {
            # datatrove filters the text as read: no whitespace collapsing on raylm's side either
            "normalize": {"collapse_whitespace": False},
            "gopher_quality": {"enabled": True, "min_words": GOPHER["min_doc_words"], "max_words": GOPHER["max_doc_words"]},
            "gopher_repetition": {"enabled": False}, "c4": {"enabled": False}, "fineweb": {"enabled": False},
            "pii": {"enabled": False},
        },
        "tokenize": {"validation_fraction": 0.0},
        "tokenizer": {"file": str(tokenizer)},
        "compute": {"workers": cpus},
    }
    path = out.parent / "raylm_bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_raylm(config: Path, out: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raylm.cli", "data", str(config)], check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "stats.json").read_text())


def raw_encode_rate(corpus: Path, tokenizer: Path, repeats: int = 3) -> float:
    """The best of ``repeats`` timings: the ceiling the stage is compared with."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    texts = [json.loads(line)["text"] for line in corpus.open()]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(texts, add_special_tokens=False))
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--work", default="out/bench_data")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest difference of the tokenized document counts, as a fraction: LSH noise")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, n_docs = build_corpus(work, args.copies)
    tokenizer = train_bench_tokenizer(corpus, work)
    print(f"corpus: {n_docs} documents, {corpus.stat().st_size / 1e6:.1f} MB; {args.cpus} CPUs", flush=True)

    out = work / "raylm"
    seconds, stats = run_raylm(raylm_config(corpus, tokenizer, out, args.cpus), out)
    raylm_rate = n_docs / seconds
    print(f"raylm data:  {seconds:7.1f} s  {raylm_rate:9.1f} docs/s (wall clock of the whole command, Ray start included)")
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove is not installed (pip install -e '.[bench]'): raylm's figures only")
        return
    dt_seconds, dt_counts = run_datatrove(corpus, tokenizer, work, args.cpus)
    dt_rate = n_docs / dt_seconds
    print(f"datatrove:   {dt_seconds:7.1f} s  {dt_rate:9.1f} docs/s")
    ours = {"after_filters": stats["documents"]["documents_out"],
            "tokenized": stats["tokens"]["train"]["documents"] + stats["tokens"]["validation"]["documents"]}
    print(f"documents kept by the Gopher filter: raylm {ours['after_filters']:,}, datatrove {dt_counts['after_filters']:,}")
    print(f"documents tokenized (after dedup):   raylm {ours['tokenized']:,}, datatrove {dt_counts['tokenized']:,} "
          f"(raylm removed {stats['dedup']['exact_duplicates_removed']:,} exact, "
          f"{stats['dedup']['near_duplicates_removed']:,} near duplicates)")
    difference = abs(ours["tokenized"] - dt_counts["tokenized"]) / max(1, dt_counts["tokenized"])
    if difference > args.tolerance:
        print(f"NOT EQUAL WORK: the tokenized counts differ by {difference:.1%} (> {args.tolerance:.0%}); no ratio")
        sys.exit(1)
    print(f"equal work: tokenized counts within {difference:.2%} (tolerance {args.tolerance:.0%})")
    print(f"ratio raylm / datatrove: {raylm_rate / dt_rate:.2f}x (target >= 1.5x)")
    raw = raw_encode_rate(corpus, tokenizer)
    tokens = sum(stats["tokens"][split]["tokens"] for split in ("train", "validation"))
    seconds = stats["seconds"]
    print(f"raw encode_batch_fast: {raw:,.0f} tokens/s on the corpus (best of 3)")
    if seconds.get("tokenize_actors"):
        stage = tokens / seconds["tokenize_actors"]
        print(f"tokenization stage (actors' busy span, encoding + shard writing): {stage:,.0f} tokens/s = "
              f"{stage / raw:.0%} of raw (target >= 70%)")
    print(f"tokens phase wall clock (Ray Data start, parquet read, dedup filter, actor start included): "
          f"{tokens / seconds['tokens']:,.0f} tokens/s = {tokens / seconds['tokens'] / raw:.0%} of raw")
    print("raylm phases (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
