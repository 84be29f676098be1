"""Starting or joining Ray from a stage's ``ray`` section."""

from __future__ import annotations

import logging
import os

from raylm.config import RayConfig


def init_ray(cfg: RayConfig, worker_modules: tuple[str, ...] = ()) -> None:
    """Join ``cfg.address`` (or the cluster of the Ray job we run in), else start a local Ray with
    the given CPUs and object store. A no-op when Ray is already up in this process.

    A local Ray starts one worker process per CPU as soon as it is up. ``worker_modules`` (what the
    stage's actors import; ``cfg.preload_modules`` overrides it) are imported by those workers then,
    while the driver goes on setting up, so that an actor placed on one starts in a fraction of a
    second: ``import torch`` alone takes 1.5-2.5 s of CPU on a small machine. An actor that imports
    torch itself must then size torch's thread pool (``torch.set_num_threads``): a worker that
    imported torch before Ray gave it an actor and set OMP_NUM_THREADS has a pool as wide as the
    machine.

    Unless ``--verbose``, the workers' output goes to the stage's log file and only raylm's own lines
    reach the console (``raylm.console``)."""
    from raylm import console

    console.set_verbose(console.CONSOLE.verbose)  # before Ray starts: its workers inherit the environment
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False} if not address else {}
    kwargs["log_to_driver"] = True  # raylm.console decides what of it reaches the console
    if not console.CONSOLE.verbose:
        kwargs["logging_level"] = "WARNING"  # the driver's "Started a local Ray instance" and such
        # Ray >= 2.5x starts a local cluster with token authentication on and says so at WARNING on the
        # console at every start; the setting stays (safe), the line goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not address:
        kwargs.update(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory)
        preload = list(worker_modules if cfg.preload_modules is None else cfg.preload_modules)
        if preload:
            kwargs["_system_config"] = {"preload_python_modules": preload}
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})
    console.install()
