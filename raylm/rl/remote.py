"""Waiting on remote calls: every wait has a timeout, and a timeout names what did not answer."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import ray

T = TypeVar("T")


def wait(refs, timeout_s: float, what: str):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from None


class Pending(Generic[T]):
    """Calls in flight on several actors (one per rank), so that the driver can start other work
    before it waits; ``result()`` waits for all of them and ``combine`` makes one result of theirs."""

    def __init__(self, refs: list, what: str, timeout_s: float, combine: Callable[[list], T] = list):
        self.refs, self.what, self.timeout_s, self.combine = refs, what, timeout_s, combine

    def result(self) -> T:
        return self.combine(wait(self.refs, self.timeout_s, self.what))
