"""Preference data for reward modelling, DPO and RLHF: JSONL pairs and rankings, and the chat
encoding every stage scores with (the built-in standard-library task is ``raylm.data.stdlib_task``).

JSONL, one record a line (blank lines are skipped):

- a pair: ``{"prompt": str, "chosen": str, "rejected": str[, "margin": number]}``;
- a ranking: ``{"prompt": str, "responses": [best, ..., worst]}``, which stands for all K(K-1)/2
  pairs (every response is preferred to every one after it).

A bad line is reported with the file, the line and the field (``pairs.jsonl:7: 'chosen': key is
missing ...``). ``on_bad_line="error"`` (the default) refuses the file and names every bad line;
``"skip"`` keeps every valid line and returns the bad ones as records to quarantine.

Encoding: a (prompt, response) is the conversation [user: prompt, assistant: response] in the
checkpoint's chat template (``raylm.data.chat_template.ChatTemplate``); with raylm's tokenizer
``<|bos|> <|user|> prompt <|end|> <|assistant|> response <|end|> <|eos|>``. A reward model reads its
score at the last token; DPO sums the log-probabilities of the response tokens and the end-of-turn
token that closes them (``<|end|>``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from raylm.data.jsonl import records
from raylm.data.sft import ResumablePosition, labels_of
from raylm.train.losses import IGNORE_INDEX

MAX_REPORTED_ERRORS = 20


class PreferenceDataError(ValueError):
    """Bad preference data; ``problems`` holds one ``{"file", "line", "field", "error"}`` per bad line."""

    def __init__(self, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.problems = problems or []


class _BadLine(Exception):
    def __init__(self, field: str, error: str):
        super().__init__(f"{field}: {error}")
        self.field, self.error = field, error


# ---- JSONL pairs and rankings --------------------------------------------------------------------

def ranking_pairs(prompt: str, responses: list[str]) -> list[dict]:
    """All K(K-1)/2 pairs of a ranking ``[best, ..., worst]``: response i is chosen over every j > i."""
    return [{"prompt": prompt, "chosen": responses[i], "rejected": responses[j]}
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise _BadLine(key, "key is missing")
    value = record[key]
    if not isinstance(value, str):
        raise _BadLine(key, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadLine(key, "is empty")
    return value


def pairs_of_record(record) -> list[dict]:
    """One JSONL record -> its preference pairs; raises ``_BadLine`` naming the field."""
    if not isinstance(record, dict):
        raise _BadLine("(line)", f"expected a JSON object, got {type(record).__name__}")
    prompt = _text(record, "prompt")
    if "responses" in record:
        if "chosen" in record or "rejected" in record:
            raise _BadLine("responses", "give either 'responses' (a ranking) or 'chosen'/'rejected' (a pair), not both")
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise _BadLine("responses", "must be a list of at least 2 strings, best first")
        for i, response in enumerate(responses):
            if not isinstance(response, str) or not response.strip():
                raise _BadLine(f"responses[{i}]", "must be a non-empty string")
        if len(set(responses)) != len(responses):
            raise _BadLine("responses", "holds the same response twice (a ranking needs distinct responses)")
        return ranking_pairs(prompt, responses)
    if "chosen" not in record and "rejected" not in record:
        raise _BadLine("chosen", "key is missing (a pair needs 'chosen' and 'rejected'; a ranking needs 'responses')")
    pair = {"prompt": prompt, "chosen": _text(record, "chosen"), "rejected": _text(record, "rejected")}
    if pair["chosen"] == pair["rejected"]:
        raise _BadLine("rejected", "is identical to 'chosen'")
    if "margin" in record:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise _BadLine("margin", f"must be a finite number, got {margin!r}")
        pair["margin"] = float(margin)
    return [pair]


def read_preferences(path: str | Path, on_bad_line: Literal["error", "skip"] = "error") -> tuple[list[dict], list[dict]]:
    """Every pair of a JSONL file (rankings expanded), in file order -> ``(pairs, bad_lines)``.

    ``on_bad_line="error"``: any bad line raises ``PreferenceDataError`` naming every bad line
    (file:line: field: what is wrong). ``"skip"``: the valid lines are all kept and the bad ones
    returned as ``{"file", "line", "field", "error"}`` records (nothing valid is lost)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file")
    pairs, bad = [], []
    with path.open("rb") as f:
        for line_no, record in records(f, path, bad):  # not UTF-8 or not JSON: a bad line, file:line
            try:
                pairs += pairs_of_record(record)
            except _BadLine as e:
                bad.append({"file": str(path), "line": line_no, "field": e.field, "error": e.error})
    if bad and on_bad_line == "error":
        shown = [f"{b['file']}:{b['line']}: {b['field']!r}: {b['error']}" if b["field"] != "(line)"
                 else f"{b['file']}:{b['line']}: {b['error']}" for b in bad[:MAX_REPORTED_ERRORS]]
        more = f"\n... and {len(bad) - MAX_REPORTED_ERRORS} more bad lines" if len(bad) > MAX_REPORTED_ERRORS else ""
        raise PreferenceDataError("\n".join(shown) + more, bad)
    if not pairs:
        raise PreferenceDataError(f"{path}: no valid preference pairs", bad)
    return pairs, bad


# ---- encoding -------------------------------------------------------------------------------------

def encode_response(template, prompt: str, response: str, seq_len: int) -> tuple[list[int], list[int]]:
    """(token ids, next-token labels) of ``prompt`` answered by ``response`` in the chat template; the
    labels are -100 everywhere but the response and its end-of-turn token. Too long: the prompt's
    text is cut from its left, then the response's from its right, so the sequence still ends as the
    template ends it (raylm's: ``<|end|> <|eos|>``)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids, target = template.encode(messages)
    if len(ids) > seq_len:
        ids, target = _truncate(ids, target, seq_len, template.encode_text(prompt), template.end_id)
    return ids, labels_of(ids, target)


def _truncate(ids: list[int], target: list[bool], seq_len: int, prompt_ids: list[int],
              end_id: int) -> tuple[list[int], list[bool]]:
    # The prompt's text is its own ids found before the first target (raylm's: at [2, first target - 2)).
    start = target.index(True) if True in target else len(ids)
    stop = len(target) - target[::-1].index(True) if True in target else len(ids)
    at = _last_occurrence(ids[:start], prompt_ids)
    prompt_text = list(range(at, at + len(prompt_ids))) if at is not None else []
    excess = len(ids) - seq_len
    cut_prompt = min(excess, max(0, len(prompt_text) - 1))
    drop = set(prompt_text[:cut_prompt])
    excess -= cut_prompt
    if excess:  # the response's text, from its right end (keep the end-of-turn token and what follows)
        response_text = list(range(start, stop - 1 if ids[stop - 1] == end_id else stop))
        drop |= set(response_text[len(response_text) - min(excess, len(response_text) - 1):])
    keep = [i for i in range(len(ids)) if i not in drop]
    return [ids[i] for i in keep][-seq_len:], [target[i] for i in keep][-seq_len:]


def _last_occurrence(ids: list[int], part: list[int]) -> int | None:
    for at in range(len(ids) - len(part), -1, -1):
        if part and ids[at:at + len(part)] == part:
            return at
    return None


def pad_batch(sequences: list[list[int]], labels: list[list[int]] | None = None, pad_id: int = 0) -> dict:
    """Right-padded ``tokens`` [B, T] and ``attention_mask`` (and ``labels`` padded with -100)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    out = {"tokens": tokens, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        if labels is not None:
            out["labels"][i, : len(seq)] = torch.tensor(labels[i])
    return out


class PairDataset(ResumablePosition):
    """Encoded preference pairs for the trainers: ``batch(indices)`` gives the chosen sequences then
    the rejected ones in one right-padded batch of 2B, with labels and per-pair margins.

    A rank's epoch order is a seeded permutation of its own slice (every ``world_size``-th pair), so
    ranks never share a pair; ``state_dict`` / ``load_state_dict`` resume at the next batch. For
    training the last ``len(pairs) % world_size`` pairs are left out so every rank has as many;
    ``drop_remainder=False`` (evaluation) keeps them, and ranks may then hold one pair more."""

    def __init__(self, pairs: list[dict], tokenizer_file: str | Path, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, default_margin: float = 0.0, drop_remainder: bool = True):
        from raylm.data.chat_template import ChatTemplate

        template = ChatTemplate(tokenizer_file)
        self.pairs = pairs
        self.encoded = [(encode_response(template, p["prompt"], p["chosen"], seq_len),
                         encode_response(template, p["prompt"], p["rejected"], seq_len)) for p in pairs]
        self.margins = [float(p.get("margin", default_margin)) for p in pairs]
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        end = len(pairs) // world_size * world_size if drop_remainder else len(pairs)
        self.mine = list(range(rank, end, world_size))
        if drop_remainder and not self.mine:
            raise PreferenceDataError(f"{len(pairs)} preference pairs: fewer than one for each of {world_size} ranks")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.mine)

    def batch(self, indices: list[int]) -> dict:
        chosen = [self.encoded[i][0] for i in indices]
        rejected = [self.encoded[i][1] for i in indices]
        out = pad_batch([c[0] for c in chosen] + [r[0] for r in rejected], [c[1] for c in chosen] + [r[1] for r in rejected])
        out["margin"] = torch.tensor([self.margins[i] for i in indices], dtype=torch.float32)
        out["index"] = torch.tensor(indices, dtype=torch.long)
        return out

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return self.mine
        return [self.mine[i] for i in np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.mine))]

    def next_batch(self, batch_size: int) -> dict:
        """The next ``batch_size`` pairs of this rank, crossing into a reshuffled next epoch when needed."""
        indices = []
        while len(indices) < batch_size:
            order = self.order(self.epoch)
            take = order[self.position : self.position + batch_size - len(indices)]
            indices += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return self.batch(indices)

    def batches(self, batch_size: int):
        """One pass over this rank's pairs in order (the last batch may be short)."""
        for start in range(0, len(self.mine), batch_size):
            yield self.batch(self.mine[start : start + batch_size])

