"""Memorization: training sequences sampled from real token shards, the exact-extraction rate of a
model trained to memorise a document against an untrained one (teacher-forced greedy check, and its
equivalence with greedy decoding), canaries and PII-like text in generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylm.actors.loglikelihood_scorer import LoglikelihoodScorer
from raylm.data.token_shards import TokenShardWriter, TokenStream, write_index
from raylm.eval.memorization import (
    canary_report,
    extraction_report,
    sample_sequences,
    scan_pii,
    split_canary,
)
from raylm.models.config import preset
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer, causal_lm_loss

VOCAB, EOS, DOC = 512, 2, 96


def documents():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (DOC,), generator=g).tolist() for _ in range(2)]  # [memorised, unseen]


def memorising_model(doc: list[int] | None, steps: int = 80, window: int = 32) -> Transformer:
    """The debug model, trained (when ``doc`` is given) on random ``window``-token crops of one
    document, as a pretraining loop meets a document in packed windows, until it has it by heart."""
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=256))
    model.init_weights(seed=0)
    if doc is not None:
        seq = torch.tensor(doc)
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin
        for _ in range(steps):
            batch = torch.stack([seq[s : s + window] for s in torch.randint(0, len(doc) - window + 1, (8,), generator=g)])
            loss = causal_lm_loss(model, batch[:, :-1], batch[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mem-shards")
    writer = TokenShardWriter(folder, "train", VOCAB, EOS, shard_tokens=50)  # one shard file per document
    for doc in documents():
        writer.add(doc)
    write_index(folder, VOCAB, EOS, {"train": writer.close()})
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem-models")
    return {"memorised": save_checkpoint(memorising_model(documents()[0]), root / "memorised"),
            "untrained": save_checkpoint(memorising_model(None), root / "untrained")}


def test_sampled_sequences_come_from_one_document(shards):
    stream = TokenStream(shards, "train")
    assert len(stream.shards) == 2  # the stream reads across shard files
    samples = sample_sequences(stream, 30, 16, 16, seed=0)
    docs = documents()
    assert len(samples) == 30 and len({s["start"] for s in samples}) == 30
    for s in samples:
        d, offset = divmod(s["start"], DOC + 1)  # each document is followed by its EOS
        assert offset + 32 <= DOC, "a window crosses a document end"
        assert s["prefix"] + s["suffix"] == docs[d][offset : offset + 32]
    with pytest.raises(ValueError, match="no window of 120 tokens inside one document"):
        sample_sequences(stream, 3, 60, 60)  # longer than any document
    with pytest.raises(ValueError, match="194 tokens, fewer than one sequence of 200"):
        sample_sequences(stream, 3, 100, 100)


def greedy_decode(model: Transformer, prefix: list[int], n: int) -> list[int]:
    ids = list(prefix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    torch.set_num_threads(threads)
    return ids[len(prefix):]


@pytest.mark.timeout(300)
def test_extraction_rate_memorised_vs_untrained(shards, checkpoints):
    samples = sample_sequences(TokenStream(shards, "train"), 24, 16, 16, seed=1)
    from_memorised = [s["start"] < DOC for s in samples]
    assert 0 < sum(from_memorised) < len(samples)  # both documents sampled
    batch = {"id": np.arange(len(samples)), "tokens": np.array([s["prefix"] + s["suffix"] for s in samples], dtype=object),
             "n_scored": np.array([len(s["suffix"]) for s in samples])}
    rates = {}
    for name, folder in checkpoints.items():
        extracted = LoglikelihoodScorer(str(folder))(batch)["is_greedy"].tolist()
        rates[name] = extraction_report(extracted)
        if name == "memorised":  # sequences of the document it was trained on (k = 16 tokens of context only)
            assert all(m for hit, m in zip(extracted, from_memorised) if hit)
            assert sum(extracted) >= 0.9 * sum(from_memorised)
        # The teacher-forced test is greedy decoding's answer: decode a few and compare.
        from raylm.models.hf_checkpoint import load_checkpoint

        model = load_checkpoint(str(folder)).eval()
        checked = [i for i, hit in enumerate(extracted) if hit][:3] + [i for i, hit in enumerate(extracted) if not hit][:3]
        for s, hit in ((samples[i], extracted[i]) for i in checked):
            decoded = greedy_decode(model, s["prefix"], len(s["suffix"]))
            assert (decoded == s["suffix"]) == hit
    n = len(samples)
    assert rates["memorised"]["extraction_rate"] >= 0.9 * sum(from_memorised) / n
    assert rates["untrained"]["extraction_rate"] == 0.0 and rates["untrained"]["n_sequences"] == n
    assert rates["untrained"]["extraction_rate_high"] < rates["memorised"]["extraction_rate_low"]


def test_pii_scan_uses_the_data_stage_patterns():
    texts = ["write to jane.doe@example.com today", "call +1 555-123-4567 now", "server at 10.0.0.12",
             "nothing here", "the <EMAIL> was redacted", "version 1.2.3 and 3.14"]
    out = scan_pii(texts)
    assert (out["pii_email_texts"], out["pii_phone_texts"], out["pii_ip_address_texts"]) == (1, 1, 1)
    assert out["pii_texts"] == 3 and out["pii_rate"] == 0.5 and out["placeholder_texts"] == 1
    assert {e["match"] for e in out["pii_examples"]} >= {"jane.doe@example.com", "10.0.0.12"}


def test_canaries():
    assert split_canary([1, 2, 3, 4], 0.5) == ([1, 2], [3, 4])
    assert split_canary([1, 2], 0.9) == ([1], [2])
    with pytest.raises(ValueError):
        split_canary([1], 0.5)
    canaries = ["my secret code is 9471 2283", "the vault key is ZX-99"]
    out = canary_report(canaries, ["9471 2283", "ZX-99"], [" 9471  2283 and more", " unknown"],
                        ["prompt: my secret code is 9471 2283 and more", "the vault key is unknown"])
    assert out["canaries_leaked"] == 1 and out["canaries_anywhere"] == 1
    assert [d["leaked"] for d in out["canary_details"]] == [True, False]
