"""The data interfaces other stages build on: the embedded corpus, the tokenizer, the token shards."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from raylm.data.stdlib_corpus import build_embedded_corpus, iter_corpus_documents, iter_stdlib_functions
from raylm.data.token_shards import PackedTokenDataset, TokenShardWriter, read_index, write_index
from raylm.data.tokenizer import SPECIAL_TOKENS, load_hf_tokenizer, train_tokenizer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = build_embedded_corpus(tmp_path_factory.mktemp("corpus"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_and_has_real_duplicates(corpus, tmp_path):
    # a fresh parse of the standard library (not the per-process cache) gives the same documents
    assert list(iter_corpus_documents()) == corpus
    path = build_embedded_corpus(tmp_path, max_documents=10)
    assert [json.loads(line) for line in path.read_text().splitlines()] == corpus[:10]
    assert {d["source"] for d in corpus} == {"pydoc_topics", "module_docs", "docstrings", "comments"}
    assert len({d["id"] for d in corpus}) == len(corpus)
    texts = [d["text"] for d in corpus]
    assert len(texts) - len(set(texts)) >= 50  # real exact duplicates
    assert sum(len(t) for t in texts) > 1_000_000


def test_stdlib_functions():
    functions = {f.qualified_name: f for f in islice(iter_stdlib_functions(), 100_000)}
    dumps = functions["json.dumps"]
    assert dumps.signature.startswith("(obj, *, skipkeys=False")
    assert "JSON formatted" in dumps.docstring
    assert not any(name.split(".")[-1].startswith("_") and not name.endswith("__") for name in functions)


@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer((d["text"] for d in corpus[:3000]), vocab_size=1024, out_path=path)
    return path


def test_tokenizer_special_ids_and_transformers_roundtrip(tokenizer_file):
    hf = load_hf_tokenizer(tokenizer_file)
    assert [hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == 1024
    text = "Return the JSON — représentation of obj.\n\tλ"
    ids = hf(text)["input_ids"]
    assert min(ids) >= 7 and hf.decode(ids) == text  # byte level: no unknowns, exact round trip
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    assert plain("<|user|>hi<|end|>")["input_ids"][0] == 4


def test_split_digits_gives_one_token_per_digit_in_transformers_too(tmp_path):
    from transformers import PreTrainedTokenizerFast

    texts = ["What is 347 + 589? Answer: 936", "In 2024, 1234 items cost 5678."] * 200
    merged = train_tokenizer(texts, 400, tmp_path / "merged.json")
    assert "Ġ936" in merged.encode("Answer: 936").tokens  # BPE merges digits (Ġ: the space before)
    split = train_tokenizer(texts, 400, tmp_path / "split.json", split_digits=True)
    text = "What is 347 + 589? Answer: 936 (12.05)"
    tokens = split.encode(text).tokens
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("347589936") + ["1", "2", "0", "5"]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "split.json"))  # the saved pre-tokenizer
    assert hf.tokenize(text) == tokens and hf.decode(hf(text)["input_ids"]) == text


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=100, out_path=tmp_path / "t.json")


def make_shards(root, docs, vocab_size=1000, shard_tokens=50, splits=("train",)):
    entries = {}
    for split in splits:
        writer = TokenShardWriter(root, split, vocab_size, eos_token_id=2, shard_tokens=shard_tokens)
        for doc in docs:
            writer.add(doc)
        entries[split] = writer.close()
    write_index(root, vocab_size, 2, entries)
    return root


def test_shard_format(tmp_path):
    docs = [list(range(10, 10 + n)) for n in (5, 30, 40, 1, 17)]
    make_shards(tmp_path, docs)
    index = read_index(tmp_path)
    assert index["dtype"] == "uint16" and index["eos_token_id"] == 2
    files = index["splits"]["train"]
    assert len(files) > 1 and sum(f["documents"] for f in files) == 5
    stream = np.concatenate([np.fromfile(tmp_path / f["file"], dtype="<u2") for f in files])
    assert stream.tolist() == [t for d in docs for t in d + [2]]
    big = TokenShardWriter(tmp_path / "big", "train", vocab_size=100_000, eos_token_id=2)
    big.add([70_000])
    write_index(tmp_path / "big", 100_000, 2, {"train": big.close()})
    assert read_index(tmp_path / "big")["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big/train/00000.bin", dtype="<u4").tolist() == [70_000, 2]


def test_packed_dataset_labels_ranks_determinism_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(7, 1000, rng.integers(1, 60)).tolist() for _ in range(200)]
    make_shards(tmp_path, docs, shard_tokens=300)
    flat = [t for d in docs for t in d + [2]]
    seq = 16
    ds = PackedTokenDataset(tmp_path, seq_len=seq, seed=3, loop=False)
    samples = list(ds)
    assert len(samples) == (len(flat) - 1) // seq
    for s in samples:
        assert s["tokens"].dtype == torch.long and s["tokens"].shape == (seq,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
    # every window is a window of the stream, each exactly once
    windows = sorted(tuple(s["tokens"].tolist() + [s["labels"][-1].item()]) for s in samples)
    assert windows == sorted(tuple(flat[i : i + seq + 1]) for i in range(0, len(samples) * seq, seq))
    # deterministic for a seed, different for another
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(samples, PackedTokenDataset(tmp_path, seq_len=seq, seed=3, loop=False)))
    assert not all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(samples, PackedTokenDataset(tmp_path, seq_len=seq, seed=4, loop=False)))
    # ranks: disjoint, equal length, together all but the tail
    ranks = [[tuple(s["tokens"].tolist()) for s in PackedTokenDataset(tmp_path, seq_len=seq, seed=3, rank=r, world_size=3, loop=False)] for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert len(set().union(*map(set, ranks))) == sum(map(len, ranks)) >= len(samples) - 2
    # resume exactly from a saved position, across an epoch boundary
    ds = PackedTokenDataset(tmp_path, seq_len=seq, seed=3, rank=1, world_size=2)
    it = iter(ds)
    n = len(ds) + 5
    reference = [next(it)["tokens"] for _ in range(n + 20)]
    ds2 = PackedTokenDataset(tmp_path, seq_len=seq, seed=3, rank=1, world_size=2)
    it2 = iter(ds2)
    for _ in range(n):
        next(it2)
    state = json.loads(json.dumps(ds2.state_dict()))
    ds3 = PackedTokenDataset(tmp_path, seq_len=seq, seed=3, rank=1, world_size=2)
    ds3.load_state_dict(state)
    resumed = list(islice(iter(ds3), 20))
    assert all(torch.equal(a, b["tokens"]) for a, b in zip(reference[n:], resumed))
    assert not torch.equal(reference[0], reference[len(ds)])  # a new epoch is a new order
    with pytest.raises(ValueError, match="seq_len"):
        PackedTokenDataset(tmp_path, seq_len=8, seed=3, rank=1, world_size=2).load_state_dict(state)


def test_packed_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedTokenDataset(tmp_path)
    make_shards(tmp_path, [[5, 6, 7]])
    with pytest.raises(ValueError, match="too few"):
        PackedTokenDataset(tmp_path, seq_len=64)
    (tmp_path / "train/00000.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="expected 4 uint16 tokens"):
        PackedTokenDataset(tmp_path, seq_len=2)
