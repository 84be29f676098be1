"""Resuming reads a checkpoint's pickled parts (DCP's .metadata index, the optimizer's non-tensor
values) through restricted unpicklers: a real checkpoint loads exactly, and one whose files name
code is refused before any of it runs (while DCP's own reader would run it)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from raylm.distributed import checkpoint as ckpt


class RunsCode:
    """What a hostile checkpoint holds: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def saved(tmp_path):
    warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
    model, optimizer = model_and_optimizer(0)
    ckpt.save(tmp_path / "ckpt", 0, model, optimizer, {"step": 1}, {"position": 7})
    return tmp_path / "ckpt", model, optimizer


def test_a_real_checkpoint_loads_exactly(saved):
    folder, model, optimizer = saved
    fresh, fresh_opt = model_and_optimizer(1)
    trainer_state, rank_state = ckpt.load(folder, 0, fresh, fresh_opt)
    assert trainer_state == {"step": 1} and rank_state == {"position": 7}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved_state, loaded_state = optimizer.state_dict(), fresh_opt.state_dict()
    assert loaded_state["param_groups"][0]["betas"] == (0.8, 0.9)
    for key, value in saved_state["state"][0].items():
        assert torch.equal(value, loaded_state["state"][0][key])


def test_metadata_that_names_code_is_refused_before_it_runs(saved, tmp_path):
    folder, _, _ = saved
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    fresh, fresh_opt = model_and_optimizer(1)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"\.metadata: names posix\.system"):
        ckpt.load(folder, 0, fresh, fresh_opt)
    assert not marker.exists()
    # DCP's own reader runs it: what the restricted one is there for
    with pytest.raises(Exception):
        FileSystemReader(str(folder)).read_metadata()
    assert marker.exists()


def test_a_value_that_names_code_is_refused_before_it_runs(tmp_path):
    warnings.simplefilter("ignore")
    marker = tmp_path / "ran"
    dcp.save({"lr": RunsCode(marker), "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "c"))
    assert not marker.exists()
    state = {"lr": 0.0, "w": torch.zeros(2)}
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"lr: not a plain value; refusing to load it"):
        ckpt.load_state(tmp_path / "c", state)
    assert not marker.exists()
