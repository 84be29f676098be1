"""Token shards: the tokenization stage's output format and the training dataset that reads it.

Layout of a shard directory::

    <dir>/index.json      {"dtype": "uint16"|"uint32", "vocab_size": V, "eos_token_id": E,
                           "splits": {"train": [{"file": "train/00000.bin", "tokens": N, "documents": D}, ...],
                                      "validation": [...]}}
    <dir>/train/*.bin     raw little-endian token ids, every document followed by EOS
    <dir>/validation/*.bin

A split is read as one virtual stream: its shards concatenated in index order. ``PackedTokenDataset``
cuts that stream into windows of ``seq_len + 1`` tokens (stride ``seq_len``, so every token is a
label once), shuffles the windows per epoch from ``(seed, epoch)``, and deals them out to
data-parallel ranks. Documents are packed across window edges (EOS separates them); a trainer that
wants per-document attention recovers boundaries from the EOS positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

INDEX_FILE = "index.json"
SPLITS = ("train", "validation")


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids 0..65535, so a vocabulary of up to 65536 tokens fits it."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _np_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise ValueError(f"dtype: must be uint16 or uint32, got {name!r}")
    return np.dtype(name).newbyteorder("<")


class TokenShardWriter:
    """Appends tokenized documents (EOS added here) to ``<dir>/<split>/<prefix>NNNNN.bin`` files,
    starting a new file once ``shard_tokens`` tokens are written (parallel writers, e.g. the
    tokenization actors, each take their own ``prefix``). Each file is written under a temporary
    name and renamed when complete, so a killed writer never leaves a half shard with a final name.
    ``close()`` returns the index entries of the files written, for ``write_index``."""

    def __init__(self, shard_dir: str | Path, split: str, vocab_size: int, eos_token_id: int,
                 shard_tokens: int = 50_000_000, prefix: str = ""):
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        self.shard_dir = Path(shard_dir)
        self.split = split
        self.prefix = prefix
        self.dtype = _np_dtype(dtype_for_vocab(vocab_size))
        self.vocab_size = vocab_size
        self.eos = np.array([eos_token_id], dtype=self.dtype)
        self.shard_tokens = shard_tokens
        self.entries: list[dict] = []
        self._file = None
        self._tokens = self._documents = 0
        (self.shard_dir / split).mkdir(parents=True, exist_ok=True)

    def _open(self):
        name = f"{self.split}/{self.prefix}{len(self.entries):05d}.bin"
        self._name = name
        self._file = open(self.shard_dir / (name + ".tmp"), "wb")
        self._tokens = self._documents = 0

    def add(self, token_ids) -> None:
        ids = np.asarray(token_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        if self._file is None:
            self._open()
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._file.write(self.eos.tobytes())
        self._tokens += ids.size + 1
        self._documents += 1
        if self._tokens >= self.shard_tokens:
            self._finish()

    def _finish(self):
        self._file.close()
        os.replace(self.shard_dir / (self._name + ".tmp"), self.shard_dir / self._name)
        self.entries.append({"file": self._name, "tokens": self._tokens, "documents": self._documents})
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.entries


def write_index(shard_dir: str | Path, vocab_size: int, eos_token_id: int, splits: dict[str, list[dict]]) -> Path:
    """Write ``index.json``; shards are listed in the order given, which is the order they are read."""
    path = Path(shard_dir) / INDEX_FILE
    index = {"dtype": dtype_for_vocab(vocab_size), "vocab_size": vocab_size, "eos_token_id": eos_token_id,
             "splits": {split: list(splits.get(split, [])) for split in SPLITS}}
    tmp = path.with_name(INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(path)
    return path


def shard_dir(data_dir: str | Path) -> Path:
    """The folder holding index.json: ``data_dir`` itself, or the ``tokens/`` that `raylm data` writes."""
    data_dir = Path(data_dir)
    if not (data_dir / "index.json").exists() and (data_dir / "tokens" / "index.json").exists():
        return data_dir / "tokens"
    return data_dir


def data_tokenizer(data_dir: str | Path) -> Path | None:
    """The data stage's tokenizer.json: beside the shards of ``data_dir`` or one folder up (None: neither)."""
    shards = shard_dir(data_dir)
    for folder in (shards, shards.parent):
        if (folder / "tokenizer.json").exists():
            return folder / "tokenizer.json"
    return None


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no token shard index (run `raylm data` first)")
    index = json.loads(path.read_text())
    for key in ("dtype", "vocab_size", "eos_token_id", "splits"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    _np_dtype(index["dtype"])
    return index


class TokenStream:
    """A split's shards as one random-access token array (memory-mapped, opened lazily)."""

    def __init__(self, shard_dir: str | Path, split: str):
        self.shard_dir = Path(shard_dir)
        index = read_index(shard_dir)
        if split not in index["splits"]:
            raise ValueError(f"{self.shard_dir / INDEX_FILE}: no split {split!r}")
        self.dtype = _np_dtype(index["dtype"])
        self.eos_token_id = index["eos_token_id"]
        self.vocab_size = index["vocab_size"]
        self.shards = [s for s in index["splits"][split] if s["tokens"] > 0]
        self.ends = np.cumsum([s["tokens"] for s in self.shards], dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.num_documents = sum(s["documents"] for s in self.shards)
        for entry in self.shards:  # a truncated or missing shard fails here, not mid-training
            path = self.shard_dir / entry["file"]
            size = path.stat().st_size if path.exists() else None
            if size != entry["tokens"] * self.dtype.itemsize:
                found = "no file" if size is None else f"{size} bytes"
                raise ValueError(f"{path}: expected {entry['tokens']} {self.dtype.name} tokens "
                                 f"({entry['tokens'] * self.dtype.itemsize} bytes), found {found}")
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.shard_dir / self.shards[i]["file"], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while filled < length:
            shard_start = int(self.ends[shard - 1]) if shard else 0
            offset = start + filled - shard_start
            part = self._shard(shard)[offset:offset + length - filled]
            out[filled:filled + len(part)] = part
            filled += len(part)
            shard += 1
        return out

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        return {**self.__dict__, "_maps": {}}


class PackedTokenDataset(IterableDataset):
    """Packed ``seq_len`` training sequences from a shard directory.

    Yields ``{"tokens": LongTensor[seq_len], "labels": LongTensor[seq_len]}`` with labels the next
    tokens. The order is a pure function of ``(seed, epoch)``; rank ``r`` of ``world_size`` takes every
    ``world_size``-th window of that order (all ranks get the same count, so they step together), and
    DataLoader workers split a rank's windows round-robin, which the DataLoader's in-order collation
    turns back into the same sequence for any ``num_workers``.

    Resuming: ``state_dict()`` is ``{"samples": k}``, the number of sequences this rank has yielded
    (counted across epochs); ``load_state_dict`` continues with sequence ``k + 1``. With
    ``num_workers > 0`` the counter lives in the workers, so the trainer should save the number of
    sequences it consumed instead: ``load_state_dict({"samples": consumed})`` is exact either way.
    """

    def __init__(self, shard_dir: str | Path, split: str = "train", seq_len: int = 256, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, loop: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.stream = TokenStream(shard_dir, split)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.loop = shuffle, loop
        self.num_windows = max(self.stream.num_tokens - 1, 0) // seq_len
        self.per_rank = self.num_windows // world_size
        if self.per_rank == 0:
            raise ValueError(f"{shard_dir}: split {split!r} has {self.stream.num_tokens} tokens, too few for one "
                             f"sequence of {seq_len + 1} tokens per rank on {world_size} rank(s)")
        self.samples = 0

    def __len__(self) -> int:
        """Sequences this rank yields per epoch."""
        return self.per_rank

    def window_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for an epoch."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        else:
            order = np.arange(self.num_windows)
        return order[self.rank:self.per_rank * self.world_size:self.world_size]

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "seq_len": self.seq_len,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "world_size", "rank", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state {key}={state[key]} does not match this dataset's {key}={getattr(self, key)}")
        self.samples = int(state["samples"])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = self.samples
        while True:
            epoch, start = divmod(position, self.per_rank)
            if epoch > 0 and not self.loop:
                return
            order = self.window_order(epoch)
            for i in range(start, self.per_rank):
                # Workers take positions i with i % num_workers == worker, counted from the global
                # position, so the interleaved output is the same for any number of workers.
                if (epoch * self.per_rank + i) % num_workers == worker:
                    window = self.stream.read(int(order[i]) * self.seq_len, self.seq_len + 1)
                    window = torch.from_numpy(window)
                    self.samples = epoch * self.per_rank + i + 1
                    yield {"tokens": window[:-1], "labels": window[1:]}
            position = (epoch + 1) * self.per_rank
