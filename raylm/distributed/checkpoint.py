"""The whole training state as one sharded distributed checkpoint (torch.distributed.checkpoint).

Sharded tensors (model and optimizer, FSDP2 DTensors) go through DCP: each rank writes its own
shard file and rank 0 the metadata, so a directory that merges every rank's files is one
checkpoint (that is how Ray Train stores the directories its workers report). What differs per
rank and is not a tensor (the data position, RNG states) goes to a small JSON file per rank; what
is the same on every rank (step, scheduler) to ``trainer_state.json``.

DCP itself pickles two things: its index (``.metadata``: tensor names, shapes, dtypes, offsets) and
the optimizer's non-tensor values (learning rate, betas). Unpickling runs whatever code a file
names, so ``load`` reads both through restricted unpicklers: the index may name only DCP's own
metadata classes and a few torch value types (``MetadataUnpickler``), the values only what
``torch.load(weights_only=True)`` accepts (numbers, strings, tuples, tensors). A checkpoint that
names anything else is refused, with the file and the class, before any of it is built.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

TRAINER_STATE = "trainer_state.json"
# What a DCP index (``.metadata``) is made of, and nothing else may be built while reading one.
METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
# Optimizer state keyed by parameter name, param groups included: pipeline stages, which hold
# different parameters, then write disjoint keys into one checkpoint.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.json"


def rng_state() -> dict:
    """Every generator a training step may draw from, as JSON-safe data."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save(folder: str | Path, rank: int, model, optimizer, trainer_state: dict, rank_state: dict) -> None:
    """Collective: every rank calls it with the same folder (or, under Ray Train, its own local
    folder that Ray merges into one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    # no_dist=False, the default: a collective save; each rank writes __<rank>_0.distcp.
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    (folder / rank_state_file(rank)).write_text(json.dumps({**rank_state, "rng": rng_state()}))
    if rank == 0:
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state))


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names code that a checkpoint never holds; nothing of it was run."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds a DCP index and nothing else: any other class or function a file names is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = name in METADATA_CLASSES.get(module, ())
        if module == "torch" and not allowed:  # dtypes are pickled as torch.<name>
            allowed = isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise UnsafeCheckpointError(f"{self.path}: names {module}.{name}, which a torch.distributed.checkpoint "
                                        "index never holds; refusing to load it (nothing was run)")
        return super().find_class(module, name)


class CheckpointReader(FileSystemReader):
    """DCP's file reader with the index read by ``MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, with every non-tensor value checked by ``torch.load(weights_only=True)`` before
    DCP builds it (DCP's own ``load_bytes`` unpickles with ``weights_only=False``)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{read_item.dest_index.fqn}: not a plain value; refusing to load it "
                                        f"(nothing was run): {str(e).splitlines()[0]}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def load_state(folder: str | Path, state: dict) -> None:
    """``dcp.load`` of ``state`` in place, its pickled parts through the restricted unpicklers; a
    refusal raises ``UnsafeCheckpointError`` (DCP would wrap it in a ``CheckpointException``)."""
    from torch.distributed.checkpoint.api import CheckpointException

    reader = CheckpointReader(str(folder))
    reader.read_metadata()  # a refused index raises here, before any collective
    try:
        dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
    except CheckpointException as e:
        refused = [err for err, _ in e.failures.values() if isinstance(err, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise


def load(folder: str | Path, rank: int, model, optimizer) -> tuple[dict, dict]:
    """Load the model and optimizer shards in place and restore this rank's RNG states; returns
    (trainer_state, rank_state). The checkpoint's pickled parts go through restricted unpicklers."""
    folder = Path(folder)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    load_state(folder, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=STATE_DICT_OPTIONS)
    rank_path = folder / rank_state_file(rank)
    if not rank_path.exists():
        raise FileNotFoundError(f"{rank_path}: the checkpoint has no state for rank {rank} "
                                "(was it written with a different number of workers?)")
    rank_state = json.loads(rank_path.read_text())
    set_rng_state(rank_state.pop("rng"))
    return json.loads((folder / TRAINER_STATE).read_text()), rank_state


def full_model_state_dict(model, on_every_rank: bool = False) -> dict[str, torch.Tensor]:
    """Collective: the unsharded fp32 weights on CPU, on rank 0 only (empty elsewhere), or on every
    rank (pipeline stages: each stage's own weights, gathered from its data-parallel shards)."""
    if on_every_rank:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.cpu() for k, v in state.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
