"""The rule-reward pool's actor: scores (prompt record, completion) batches with a named rule, a
built-in task family's checker or a user's Python function (``raylm.tasks.rewards``), beside or
instead of the reward model's ``RewardScorer``.

Per item: a user function runs in a child process with ``timeout_s``; a crash, a hang or a result
that is no number is that item's failure (``failure_score``, with the reason), and the actor goes
on. Nothing here imports torch, so an actor starts in well under a second."""

from __future__ import annotations

import ray

from raylm.tasks.rewards import Reward, RuleReward, parse_spec


@ray.remote
class RuleRewardScorer:
    def __init__(self, spec=None, timeout_s: float = 5.0):
        self.reward = Reward(spec, timeout_s)

    def ready(self) -> bool:
        return True

    def score(self, items: list[dict], completions: list) -> dict:
        """``{"scores": [float], "ok": [bool], "reasons": [str]}``, one each per item, in order."""
        results = self.reward.score(items, completions)
        return {"scores": [r.score for r in results], "ok": [r.ok for r in results],
                "reasons": [r.reason for r in results]}

    def close(self) -> None:
        self.reward.close()


class RuleRewardPool:
    """``num_actors`` scorers; a batch is split evenly over them, in order, and put back together.
    Every remote wait has a timeout: the actors' start, and per batch the per-item timeout times
    the largest share plus ``slack_s``."""

    def __init__(self, spec=None, num_actors: int = 1, cpus_per_actor: float = 0.25, timeout_s: float = 5.0,
                 start_timeout_s: float = 120.0, slack_s: float = 30.0):
        if spec is not None:  # a bad spec fails here, naming the key, before any actor starts
            parsed = parse_spec(spec)
            if "rule" in parsed:
                RuleReward(parsed)
        if num_actors < 1:
            raise ValueError(f"num_actors: expected at least 1, got {num_actors}")
        self.timeout_s, self.slack_s = timeout_s, slack_s
        self.actors = [RuleRewardScorer.options(num_cpus=cpus_per_actor).remote(spec, timeout_s)
                       for _ in range(num_actors)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout_s)
        except ray.exceptions.RayActorError as e:  # the constructor's error (a function that cannot load)
            self.shutdown()
            cause = getattr(e, "cause", None) or e
            raise RuntimeError(f"rule reward actors did not start: {cause}") from None

    def score(self, items: list[dict], completions: list) -> dict:
        if len(items) != len(completions):
            raise ValueError(f"{len(items)} prompt records but {len(completions)} completions")
        n = len(self.actors)
        bounds = [len(items) * i // n for i in range(n + 1)]
        calls = [actor.score.remote(items[lo:hi], completions[lo:hi])
                 for actor, lo, hi in zip(self.actors, bounds, bounds[1:]) if hi > lo]
        largest = max((hi - lo for lo, hi in zip(bounds, bounds[1:])), default=0)
        parts = ray.get(calls, timeout=largest * (self.timeout_s + 1.0) + self.slack_s)
        return {key: [v for part in parts for v in part[key]] for key in ("scores", "ok", "reasons")}

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(actor)
        self.actors = []
