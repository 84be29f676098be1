"""Generation as a Ray Data stage over a pool of engine actors (``actors/generation_engine.py``).

``EngineGeneration`` is the ``map_batches`` class: Ray Data runs one instance per engine
(``concurrency`` = the pool's size); each instance takes one engine from the ``EngineLease`` in its
constructor and sends it its batches, so every engine generates while Ray Data streams prompts in
and completions out. A row holds ``row`` (its index), ``prompt_ids`` and ``seed``; the batch comes
back with ``completion_ids``. The engines are started once by the driver (an engine start costs
tens of seconds) and are handed over as actor handles: values, not ``ObjectRef``s, which
``map_batches`` would pass on unresolved.
"""

from __future__ import annotations

import ray

GENERATE_TIMEOUT_S = 1800  # one batch on one engine


@ray.remote(num_cpus=0)
class EngineLease:
    """Hands out engine indices 0, 1, ... to the ``map_batches`` instances, one each."""

    def __init__(self, n: int):
        self.n, self.next_index = n, 0

    def take(self) -> int:
        index = self.next_index % self.n
        self.next_index += 1
        return index


class EngineGeneration:
    def __init__(self, engines: list, lease, sampling: dict, stop_token_ids: list[int] | None = None):
        """``sampling``: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k`` of the engines'
        ``generate``; each row's own ``seed`` makes its sample reproducible."""
        self.engine = engines[ray.get(lease.take.remote(), timeout=60)]
        self.sampling = dict(sampling)
        self.stop_token_ids = list(stop_token_ids or [])

    def __call__(self, batch: dict) -> dict:
        prompts = [[int(t) for t in p] for p in batch["prompt_ids"]]
        seeds = [int(s) for s in batch["seed"]]
        results = ray.get(self.engine.generate.remote(prompts, seed=seeds, stop_token_ids=self.stop_token_ids,
                                                      **self.sampling), timeout=GENERATE_TIMEOUT_S)
        return {"row": batch["row"], "completion_ids": [r["tokens"] for r in results]}


def generate_rows(engines: list, prompts: list[list[int]], seeds: list[int], sampling: dict,
                  stop_token_ids: list[int] | None, batch_size: int) -> list[list[int]]:
    """The completion of every prompt, in order: a Ray Data pipeline of ``EngineGeneration`` over
    ``engines``."""
    import numpy as np

    if not prompts:
        return []
    lease = EngineLease.remote(len(engines))
    rows = [{"row": i, "prompt_ids": np.asarray(p, dtype=np.int64), "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), len(engines) * 4)))
    ds = ds.map_batches(EngineGeneration, fn_constructor_args=(engines, lease, sampling, stop_token_ids),
                        batch_size=batch_size, batch_format="numpy", concurrency=len(engines), num_cpus=0.01)
    out: list = [None] * len(prompts)
    for row in ds.iter_rows():
        out[int(row["row"])] = [int(t) for t in row["completion_ids"]]
    ray.kill(lease)
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        raise RuntimeError(f"engine generation: {len(missing)} prompt(s) came back without a completion (rows {missing[:5]})")
    return out
