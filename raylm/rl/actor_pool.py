"""A pool of single actors of one role (rollout engines, reward scorers, reference models), each in
its own placement bundle. Work goes out as one shard per actor; an actor that dies is replaced in
its bundle (at most ``max_restarts`` times per role over the run) and its shard is retried."""

from __future__ import annotations

import logging
from typing import Any, Callable

import ray
from ray.actor import ActorHandle

from raylm.rl.remote import wait

log = logging.getLogger("raylm.rlhf")

Call = Callable[[ActorHandle, Any], ray.ObjectRef]  # (actor, its shard) -> the remote call's future


class InFlight:
    """Shards submitted to a pool and not yet collected."""

    def __init__(self, call: Call, shards: list, refs: dict[int, ray.ObjectRef], what: str):
        self.call, self.shards, self.refs, self.what = call, shards, refs, what


class ActorPool:
    def __init__(self, role: str, start: Callable[[int], ActorHandle], size: int, max_restarts: int,
                 remote_s: float, startup_s: float, replacements: list[tuple[str, int]],
                 on_replace: Callable[[ActorHandle], ray.ObjectRef | None] | None = None):
        self.role, self.start, self.max_restarts = role, start, max_restarts
        self.remote_s, self.startup_s = remote_s, startup_s
        self.replacements = replacements  # shared by the run's pools: (role, index) of every actor replaced
        self.on_replace = on_replace  # what a fresh actor must be given before it works (an engine: the weights)
        self.actors = [start(i) for i in range(size)]

    def __len__(self) -> int:
        return len(self.actors)

    def ready(self) -> list[ray.ObjectRef]:
        return [a.ready.remote() for a in self.actors]

    def submit(self, call: Call, shards: list, what: str) -> InFlight:
        """Actor i runs ``call(actor, shards[i])`` (a None shard: nothing to do)."""
        refs = {i: call(self.actors[i], shard) for i, shard in enumerate(shards) if shard is not None}
        return InFlight(call, shards, refs, what)

    def collect(self, flight: InFlight) -> list:
        """-> the results in shard order (None for a None shard); a dead actor's shard is retried on its replacement."""
        results = [None] * len(flight.shards)
        pending = flight.refs
        while pending:
            retry = []
            for i, ref in pending.items():
                try:
                    results[i] = wait(ref, self.remote_s, f"{flight.what} ({self.role} actor {i})")
                except ray.exceptions.RayActorError as error:
                    self.replace(i, error)
                    retry.append(i)
            pending = {i: flight.call(self.actors[i], flight.shards[i]) for i in retry}
        return results

    def fan_out(self, call: Call, shards: list, what: str) -> list:
        return self.collect(self.submit(call, shards, what))

    def replace(self, i: int, error: Exception) -> None:
        """A fresh actor in the dead one's place (its bundle is free again)."""
        done = sum(1 for role, _ in self.replacements if role == self.role)
        if done >= self.max_restarts:
            raise RuntimeError(f"{self.role} actor {i} died ({type(error).__name__}); {self.role} actors were already "
                               f"replaced {done} times (faults.max_actor_restarts: {self.max_restarts})") from error
        msg = f"{self.role} actor {i} died ({type(error).__name__}): starting a replacement ({done + 1}/{self.max_restarts})"
        log.warning(msg)
        print(f"[rlhf] {msg}", flush=True)
        ray.kill(self.actors[i])  # already dead, or unreachable: make sure it stays gone
        self.actors[i] = self.start(i)
        wait(self.actors[i].ready.remote(), self.startup_s, f"replacement {self.role} actor {i}")
        if self.on_replace is not None:
            ref = self.on_replace(self.actors[i])
            if ref is not None:
                wait(ref, self.remote_s, f"preparing the replacement {self.role} actor {i}")
        self.replacements.append((self.role, i))

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
