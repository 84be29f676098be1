"""Decontamination against token shards: which evaluation items share a token n-gram with the
training data, read straight from the shards ``raylm data`` wrote (``raylm.data.token_shards`` format).

Eval items are tokenised with the tokenizer the shards were made with, so an n-gram here is n
consecutive training tokens, exactly what the model saw. Every n-gram of the training stream is
hashed (a 64-bit polynomial hash, vectorised over chunks of the memory-mapped shards) and looked up
among the items' n-gram hashes; memory stays at one chunk plus the items' hashes, whatever the size
of the shards. Items shorter than n tokens cannot be tested and are reported as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raylm.data.token_shards import TokenStream

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
