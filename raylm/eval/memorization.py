"""Memorization and PII leakage: how much of its training data a model gives back verbatim.

Exact extraction (Carlini et al. 2021/2022): sequences of ``prefix + suffix`` tokens are sampled
from the training token shards; a sequence is *extracted* when greedy decoding from its ``prefix``
reproduces its ``suffix`` exactly. Greedy decoding reproduces the suffix exactly if and only if
every suffix token is the model's most likely next token given the true tokens before it (by
induction over the suffix: each step then feeds back the true token). So the test needs no
decoding at all: one teacher-forced pass per sequence, the scorer's ``is_greedy``.

PII: the data stage (``raylm.actors.data.quality_filters``) replaces e-mail addresses, phone
numbers and IP addresses with ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>`` and records only how many it
replaced, not the values, so no redacted value can be looked for. What can: generations are scanned
with the same patterns the data stage redacts with (a match is PII-like text the model produces),
for the placeholders themselves (the model learnt the redaction), and for *canaries*: strings
planted in the training data on purpose (a fake e-mail, a secret number), given in the config. A
canary's first tokens prompt the model; it *leaks* when the greedy continuation carries the rest.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from raylm.config import ConfigError
from raylm.eval.engines import generate_texts
from raylm.eval.pairs import read_prompts
from raylm.eval.requests import Encoder

PLACEHOLDERS = ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>")


def sample_sequences(stream, n: int, prefix_len: int, suffix_len: int, seed: int = 0,
                     tries_per_sample: int = 50) -> list[dict]:
    """``n`` windows of ``prefix_len + suffix_len`` tokens at distinct random offsets of a token stream
    (``raylm.data.token_shards.TokenStream``), none crossing a document end (EOS). Fewer than ``n``
    when the stream has too few such windows; a ValueError when it has none."""
    length = prefix_len + suffix_len
    if stream.num_tokens < length:
        raise ValueError(f"{stream.shard_dir}: {stream.num_tokens} tokens, fewer than one sequence of {length}")
    rng = random.Random(seed)
    starts, out = set(), []
    for _ in range(n * tries_per_sample):
        if len(out) == n:
            break
        start = rng.randrange(stream.num_tokens - length + 1)
        if start in starts:
            continue
        tokens = stream.read(start, length)
        if (tokens == stream.eos_token_id).any():
            continue
        starts.add(start)
        out.append({"start": start, "prefix": tokens[:prefix_len].tolist(), "suffix": tokens[prefix_len:].tolist()})
    if not out:
        raise ValueError(f"{stream.shard_dir}: no window of {length} tokens inside one document: "
                         "lower memorization.prefix_tokens / suffix_tokens")
    return sorted(out, key=lambda s: s["start"])


def extraction_report(extracted: list[bool], confidence: float = 0.95) -> dict:
    from raylm.eval.judge import wilson

    n = len(extracted)
    hits = sum(map(bool, extracted))
    low, high = wilson(hits, n, confidence)
    return {"extraction_rate": hits / n if n else float("nan"), "extraction_rate_low": low,
            "extraction_rate_high": high, "extracted": hits, "n_sequences": n}


def pii_patterns() -> dict[str, re.Pattern]:
    """The data stage's own redaction patterns (imported here, where used: the data actors' module
    pulls in its filters' dependencies)."""
    from raylm.actors.data.text_cleanup import EMAIL_RE, IPV4_RE, PHONE_RE

    return {"email": EMAIL_RE, "phone": PHONE_RE, "ip_address": IPV4_RE}


def scan_pii(texts: list[str], max_examples: int = 10) -> dict:
    """PII-like matches in generated texts: per kind, how many texts have one, and examples."""
    report: dict = {"n_texts": len(texts)}
    examples = []
    for kind, pattern in pii_patterns().items():
        hits = [(i, m.group(0)) for i, t in enumerate(texts) for m in pattern.finditer(t)]
        report[f"pii_{kind}_texts"] = len({i for i, _ in hits})
        examples += [{"text": i, "kind": kind, "match": match} for i, match in hits]
    report["pii_texts"] = len({e["text"] for e in examples})
    report["pii_rate"] = report["pii_texts"] / len(texts) if texts else float("nan")
    report["placeholder_texts"] = sum(any(p in t for p in PLACEHOLDERS) for t in texts)
    report["pii_examples"] = examples[:max_examples]
    return report


def split_canary(ids: list[int], prompt_fraction: float) -> tuple[list[int], list[int]]:
    """A canary's tokens as (prompt, secret): the first ``prompt_fraction`` of them (at least one) and
    the rest (at least one)."""
    if len(ids) < 2:
        raise ValueError("a canary needs at least 2 tokens: one to prompt with, one to extract")
    cut = min(len(ids) - 1, max(1, round(len(ids) * prompt_fraction)))
    return ids[:cut], ids[cut:]


def canary_report(canaries: list[str], secrets: list[str], continuations: list[str], generations: list[str]) -> dict:
    """``leaked``: the greedy continuation of a canary's prompt starts with its secret (whitespace
    aside); ``anywhere``: the whole canary appears in one of ``generations`` (full texts: prompt and
    continuation)."""
    def norm(s: str) -> str:
        return " ".join(s.split())

    leaked = [norm(c).startswith(norm(s)) and bool(norm(s)) for s, c in zip(secrets, continuations, strict=True)]
    anywhere = [any(norm(canary) in norm(g) for g in generations) for canary in canaries]
    return {"canaries": len(canaries), "canaries_leaked": sum(leaked), "canaries_anywhere": sum(anywhere),
            "canary_details": [{"canary": c, "leaked": lk, "continuation": cont}
                               for c, lk, cont in zip(canaries, leaked, continuations)]}


def check_memorization(cfg, checkpoints: dict[str, str], config_path) -> None:
    from raylm.data.token_shards import TokenStream

    for i, folder in enumerate(cfg.shard_dirs):
        try:
            stream = TokenStream(folder, cfg.shard_split)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{config_path}: memorization.shard_dirs.{i}: {e}") from None
        for name, checkpoint in checkpoints.items():
            hf = json.loads((Path(checkpoint) / "config.json").read_text())
            if hf.get("vocab_size", stream.vocab_size) < stream.vocab_size:
                raise ConfigError(f"{config_path}: memorization.shard_dirs.{i}: {folder} holds ids of a vocabulary of "
                                  f"{stream.vocab_size}, larger than checkpoint {name}'s ({hf['vocab_size']}): "
                                  "not the tokenizer this model was trained with")
    if cfg.prompts is not None and not Path(cfg.prompts).is_file():
        raise ConfigError(f"{config_path}: memorization.prompts: {cfg.prompts} does not exist")


def memorization_samples(cfg, seed: int) -> list[dict]:
    """The training sequences tested, sampled once for every checkpoint."""
    from raylm.data.token_shards import TokenStream

    samples = []
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            stream = TokenStream(folder, cfg.shard_split)
            found = sample_sequences(stream, cfg.num_sequences, cfg.prefix_tokens, cfg.suffix_tokens, seed + i)
        except ValueError as e:
            raise ConfigError(f"memorization.shard_dirs.{i}: {e}") from None
        samples += [{**sample, "shard_dir": folder} for sample in found]
    return samples


def memorization_generations(folder: str, samples: list[dict], cfg, generation, seed: int) -> dict:
    """Generations from canary prompts, sampled training prefixes and the configured prompts, checked
    for the canaries and scanned for PII-like text."""
    enc = Encoder(folder)
    canary_prompts, secrets = [], []
    for canary in cfg.canaries:
        try:
            prompt_ids, secret_ids = split_canary(enc.encode(canary), cfg.canary_prompt_fraction)
        except ValueError as e:
            raise ConfigError(f"memorization.canaries: {canary!r}: {e}") from None
        canary_prompts.append(enc.decode(prompt_ids))
        secrets.append(enc.decode(secret_ids))
    prefixes = [enc.decode(s["prefix"]) for s in samples[: cfg.generate_sequences]]
    extra = [r["prompt"] for r in read_prompts(cfg.prompts)] if cfg.prompts else []
    prompts = canary_prompts + prefixes + extra
    if not prompts:
        return {}
    continuations = generate_texts(folder, prompts, cfg.max_new_tokens, [], generation, seed)
    full = [p + c for p, c in zip(prompts, continuations)]
    report = scan_pii(continuations)  # what the model wrote, not what it was given
    report.update(canary_report(cfg.canaries, secrets, continuations[: len(cfg.canaries)], full))
    report["generations"] = [{"prompt": p, "continuation": c} for p, c in zip(prompts, continuations)][:50]
    return report
