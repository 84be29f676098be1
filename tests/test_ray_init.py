"""A local Ray started by raylm for a stage: its first workers import the stage's modules as they start,
before any actor asks for them, and an actor placed on such a worker still runs torch on the CPUs it
was given."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from raylm.config import RayConfig
from raylm.eval.engines import start_scorers
from raylm.pipelines.eval import WORKER_MODULES, ScorerConfig
from raylm.ray_init import init_ray
from test_eval_fixtures import build_checkpoint, build_tokenizer


def idle_workers_holding(library: str) -> set[int]:
    """Ray worker processes that no task or actor has claimed yet, with ``library`` mapped in."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    pids = {int(line.split()[0]) for line in out.splitlines()[1:] if "ray::IDLE" in line}
    holding = set()
    for pid in pids:
        try:
            if library in Path(f"/proc/{pid}/maps").read_text():
                holding.add(pid)
        except OSError:  # gone meanwhile
            pass
    return holding


@pytest.mark.timeout(300)
def test_eval_workers_hold_torch_before_the_scorers_start_and_scorers_keep_their_threads(tmp_path):
    assert "torch" in WORKER_MODULES
    checkpoint = build_checkpoint(tmp_path / "checkpoint", build_tokenizer(tmp_path / "tokenizer.json"), seed=1)
    if ray.is_initialized():  # another module's Ray: this test is about how raylm starts one
        ray.shutdown()
    init_ray(RayConfig(num_cpus=2), WORKER_MODULES)
    try:
        deadline = time.monotonic() + 120
        while not (preloaded := idle_workers_holding("libtorch_cpu")):
            assert time.monotonic() < deadline, "no Ray worker imported torch as it started"
            time.sleep(0.5)

        [scorer] = start_scorers(str(checkpoint), ScorerConfig(num_actors=1, cpus_per_actor=1))
        pid, threads = ray.get(scorer.__ray_call__.remote(lambda self: (__import__("os").getpid(),
                                                                          __import__("torch").get_num_threads())))
        assert pid in preloaded  # the scorer started on a worker that already held torch
        # torch sized its thread pool when the worker imported it, before Ray gave the worker this
        # 1-CPU actor; the scorer sets it to its CPUs, or two scorers on two cores would run four threads.
        assert threads == 1
        tokens = np.array([[5, 6, 7, 8], [5, 6, 9]], dtype=object)
        out = ray.get(scorer.__call__.remote({"id": np.arange(2), "tokens": tokens, "n_scored": np.array([2, 1])}))
        assert np.isfinite(out["logprob"]).all() and (out["logprob"] < 0).all()
    finally:
        ray.shutdown()
