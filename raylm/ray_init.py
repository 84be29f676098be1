"""Starting or joining Ray from a stage's ``ray`` section."""

from __future__ import annotations

import os

from raylm.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` (or the cluster of the Ray job we run in), else start a local Ray with
    the given CPUs and object store. A no-op when Ray is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True, "include_dashboard": False} if not address else {}
    if not address:
        kwargs.update(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory)
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})
