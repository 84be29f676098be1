"""Instruction data for SFT: JSONL conversations -> chat-formatted token ids with the prompt masked
out of the loss -> several examples packed into each training sequence.

Each JSONL line is either ``{"prompt": ..., "response": ...}`` (optionally ``"system"``) or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. Conversations are
formatted with the checkpoint's own chat template (``raylm.data.chat_template.ChatTemplate``); raylm's
tokenizer has its role-token format (``raylm.data.tokenizer.RAYLM_CHAT_TEMPLATE``)::

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ... <|eos|>

Only the assistant turns' text and their end-of-turn token (``<|end|>``, ``<|im_end|>``, ...) are
trained on (the model learns to answer and to stop); every other position has label -100. Packed sequences carry ``document_ids``
so the trainer builds a mask with no attention across examples and positions that restart per
example (``models.transformer.document_causal_mask`` / ``document_positions``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from raylm.data.chat_template import ChatTemplate, ChatTemplateError
from raylm.data.jsonl import records
from raylm.data.tokenizer import PAD_ID
from raylm.train.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


class SFTDataError(ValueError):
    pass


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Every line as a list of ``{"role", "content"}`` messages. A bad line raises ``SFTDataError``
    naming the file, the line and the key; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise SFTDataError(f"{path}: no such file")
    conversations = []
    with path.open("rb") as f:
        for line_no, record in records(f, path, error=SFTDataError):  # not UTF-8 or not JSON: file:line
            conversations.append(conversation_of(record, f"{path}:{line_no}"))
    if not conversations:
        raise SFTDataError(f"{path}: no examples")
    return conversations


def conversation_of(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: key 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise SFTDataError(f"{where}: messages[{i}].role must be one of {ROLES}")
            if not isinstance(message.get("content"), str):
                raise SFTDataError(f"{where}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise SFTDataError(f"{where}: key 'messages' has no assistant turn to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise SFTDataError(f"{where}: key {key!r} must be a string (or give 'messages')")
    messages = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
    return messages + [{"role": "user", "content": record["prompt"]},
                       {"role": "assistant", "content": record["response"]}]


def labels_of(ids: list[int], target: list[bool]) -> list[int]:
    """Next-token labels: position i predicts ids[i+1] where that token is a target, else -100."""
    return [ids[i + 1] if target[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack(examples: list[tuple[list[int], list[int]]], order: np.ndarray, seq_len: int) -> list[dict]:
    """Greedy in-order packing of (ids, labels) examples into ``seq_len`` sequences; an example that
    does not fit in what is left starts a new sequence, one longer than ``seq_len`` is truncated.
    Padding has label -100 and its own document id."""
    sequences, tokens, labels, docs = [], [], [], []

    def close():
        fill = seq_len - len(tokens)
        doc = (docs[-1] + 1) if docs else 0
        sequences.append({"tokens": torch.tensor(tokens + [PAD_ID] * fill),
                          "labels": torch.tensor(labels + [IGNORE_INDEX] * fill),
                          "document_ids": torch.tensor(docs + [doc] * fill)})

    for index in order:
        ids, example_labels = examples[int(index)]
        ids, example_labels = ids[:seq_len], example_labels[:seq_len]
        if tokens and len(tokens) + len(ids) > seq_len:
            close()
            tokens, labels, docs = [], [], []
        doc = (docs[-1] + 1) if docs else 0
        tokens += ids
        labels += example_labels
        docs += [doc] * len(ids)
    if tokens:
        close()
    return sequences


class ResumablePosition:
    """The (epoch, position) a rank's dataset has reached, saved with checkpoints: ``state_dict`` /
    ``load_state_dict``. A state saved under another seed, rank or world size is refused."""

    epoch: int
    position: int
    seed: int
    rank: int
    world_size: int

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"state {key}={state[key]} does not match this dataset's {key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class PackedSFTDataset(ResumablePosition, IterableDataset):
    """Packed chat-formatted examples from a JSONL file, as a torch ``IterableDataset`` yielding
    ``{"tokens", "labels", "document_ids"}`` (LongTensor[seq_len] each).

    Every epoch shuffles the examples with ``(seed, epoch)`` and packs them; rank ``r`` takes every
    ``world_size``-th packed sequence, and all ranks take the same number. ``state_dict()`` is the
    (epoch, position) reached; ``load_state_dict`` resumes at the next sequence."""

    def __init__(self, path: str | Path, tokenizer_file: str | Path, seq_len: int = 512, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, loop: bool = True,
                 system_prompt: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        template = ChatTemplate(tokenizer_file)
        self.examples = []
        for number, messages in enumerate(read_conversations(path), 1):
            try:
                ids, target = template.encode(messages, system_prompt)
            except ChatTemplateError as e:
                raise SFTDataError(f"{path}: conversation {number}: {e}") from None
            self.examples.append((ids, labels_of(ids, target)))
        self.path, self.seq_len, self.seed = str(path), seq_len, seed
        self.rank, self.world_size, self.shuffle, self.loop = rank, world_size, shuffle, loop
        self.epoch, self.position = 0, 0
        if self.per_rank(0) == 0:
            raise SFTDataError(f"{path}: {len(self.examples)} examples pack into fewer than one sequence of "
                               f"{seq_len} tokens per rank on {world_size} rank(s)")

    def sequences(self, epoch: int) -> list[dict]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)) if self.shuffle
                 else np.arange(len(self.examples)))
        return pack(self.examples, order, self.seq_len)

    def per_rank(self, epoch: int) -> int:
        return len(self.sequences(epoch)) // self.world_size

    def __iter__(self) -> Iterator[dict]:
        while True:
            sequences = self.sequences(self.epoch)
            mine = sequences[self.rank:len(sequences) // self.world_size * self.world_size:self.world_size]
            while self.position < len(mine):
                self.position += 1
                yield mine[self.position - 1]
            if not self.loop:
                return
            self.epoch, self.position = self.epoch + 1, 0

    def sequences_per_epoch(self) -> int:
        """Sequences each rank reads in the first epoch (later epochs pack to about as many)."""
        return self.per_rank(0)
