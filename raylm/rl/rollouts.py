"""Where a step's rollouts come from: the rollout queue.

Synchronous (``rollout.max_staleness: 0``): a step's rollouts are generated when the step starts,
all by the current policy version. Asynchronous (N > 0): the engines run up to N steps ahead; the
batches of the next N steps are submitted before the trainer trains, and each engine serves its
calls in order, so a batch submitted before a weight publication is generated with the weights
before it: a step's rollouts are at most N policy versions old (checked). Every rollout records
its version; the step logs the lag.

Then the rewards (``raylm.rl.rewards``), and with ``ppo.dynamic_sampling`` the groups whose samples
all score the same are dropped and more prompts sampled to refill them (at most
``ppo.max_sampling_rounds`` rounds; any shortfall is filled with dropped groups, which carry no
policy gradient)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylm.rl.config import Config
from raylm.rl.pools import Pools
from raylm.rl.ppo import informative_groups
from raylm.rl.prompts import PromptSampler, Task, rollout_seeds
from raylm.rl.rewards import Scores, score_rollouts


@dataclass
class Rollouts:
    owners: list[dict]  # the prompt record each rollout answers (a prompt's samples are consecutive)
    prompts: list[list[int]]
    responses: list[list[int]]
    engine_logprobs: list[list[float]]  # the engines' log-probs of the sampled tokens
    versions: list[int]  # the policy version that generated each rollout
    scores: Scores | None = None
    rounds: int = 1  # dynamic sampling: rollout rounds this step took
    dropped_groups: int = 0  # dynamic sampling: groups without signal left out (or used as filler)
    # rollout.tools (raylm.rl.tool_rollouts): per response token 1 where the model generated it (None: all are),
    # and per episode its assistant turns and tool calls
    masks: list[list[int]] | None = None
    turns: list[int] | None = None
    tool_calls: list[int] | None = None

    EPISODE_FIELDS = ("masks", "turns", "tool_calls")

    def rows(self, index: list[int]) -> "Rollouts":
        pick = lambda xs: [xs[i] for i in index] if xs is not None else None  # noqa: E731
        scores = self.scores.rows(torch.tensor(index, dtype=torch.long)) if self.scores is not None else None
        return Rollouts(pick(self.owners), pick(self.prompts), pick(self.responses), pick(self.engine_logprobs),
                        pick(self.versions), scores, self.rounds, self.dropped_groups,
                        *(pick(getattr(self, name)) for name in self.EPISODE_FIELDS))

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        cat = lambda name: ([x for p in parts for x in getattr(p, name)]  # noqa: E731
                            if getattr(parts[0], name) is not None else None)
        scores = Scores.concat([p.scores for p in parts]) if all(p.scores is not None for p in parts) else None
        return Rollouts(cat("owners"), cat("prompts"), cat("responses"), cat("engine_logprobs"), cat("versions"),
                        scores, 1, 0, *(cat(name) for name in Rollouts.EPISODE_FIELDS))


def collect_rollouts(config: Config, pools: Pools, task: Task, owners: list[dict], prompts: list[list[int]], flight,
                     seeds: list[int] | None, temperature: float) -> Rollouts:
    """The rollouts of a submitted ``flight`` (with ``rollout.tools``: played on as episodes) and their rewards."""
    rollouts = pools.collect_rollouts(flight)
    if config.rollout.tools is None:
        batch = Rollouts(owners, prompts, [r["tokens"] for r in rollouts], [r["logprobs"] for r in rollouts],
                         [r["policy_version"] for r in rollouts])
        batch.scores = score_rollouts(config, pools, task, owners, prompts, batch.responses)
        return batch
    from raylm.rl.tool_rollouts import play_episodes

    episodes = play_episodes(pools, config, task, owners, prompts, rollouts, seeds, temperature)
    batch = Rollouts(owners, prompts, [e.tokens for e in episodes], [e.logprobs for e in episodes],
                     [e.version for e in episodes], masks=[e.mask for e in episodes],
                     turns=[e.turns for e in episodes], tool_calls=[e.tool_calls for e in episodes])
    batch.scores = score_rollouts(config, pools, task, owners, prompts, batch.responses,
                                  texts=[e.transcript() for e in episodes])
    return batch


class RolloutQueue:
    def __init__(self, config: Config, pools: Pools, task: Task, sampler: PromptSampler):
        self.config, self.pools, self.task, self.sampler = config, pools, task, sampler
        self.in_flight: dict[int, tuple] = {}  # step -> (owners, prompts, the engines' calls, seeds)
        self.sampler_before: dict[int, dict] = {}  # step -> the sampler's state before its prompts were drawn

    def _submit(self, step: int, n_prompts: int, round_: int = 0):
        ppo = self.config.ppo
        items = self.sampler.next(n_prompts)
        owners = [item for item in items for _ in range(ppo.samples_per_prompt)]
        prompts = [item["ids"] for item in owners]
        seeds = rollout_seeds(self.config.seed, step, len(prompts), start=round_ * 10_000)
        flight = self.pools.submit_rollouts(prompts, self.task.stop_ids, self.config.rollout.temperature, seeds)
        return owners, prompts, flight, seeds

    def _collect(self, owners: list[dict], prompts: list[list[int]], flight, seeds: list[int]) -> Rollouts:
        return collect_rollouts(self.config, self.pools, self.task, owners, prompts, flight, seeds,
                                self.config.rollout.temperature)

    def sampler_state(self, next_step: int) -> dict:
        """The sampler as a checkpoint must keep it: before the prompts of ``next_step`` (and of the
        steps after it already in flight) were drawn, so that a resumed run draws them again."""
        return self.sampler_before.get(next_step, self.sampler.state_dict())

    def next(self, step: int, version: int) -> Rollouts:
        """Step ``step``'s rollouts and rewards, the trainer being at policy ``version``."""
        ppo, ahead = self.config.ppo, self.config.rollout.max_staleness
        for k in range(step, min(step + ahead, ppo.steps) + 1):
            if k not in self.in_flight:
                self.sampler_before[k] = self.sampler.state_dict()
                self.in_flight[k] = self._submit(k, ppo.prompts_per_step)
        self.sampler_before.pop(step - 1, None)
        batch = self._collect(*self.in_flight.pop(step))
        stale = [v for v in batch.versions if not 0 <= version - v <= ahead]
        if stale:
            raise RuntimeError(f"step {step}: rollouts from policy versions {sorted(set(batch.versions))}, expected "
                               + (f"{version}" if ahead == 0 else f"{version - ahead} to {version} "
                                  f"(rollout.max_staleness: {ahead})"))
        if ppo.dynamic_sampling:
            batch = self.refill(step, batch)
        return batch

    def refill(self, step: int, batch: Rollouts) -> Rollouts:
        """Dynamic sampling: keep the groups with a signal; sample more prompts until there are
        ``prompts_per_step`` of them or ``max_sampling_rounds`` rounds are done."""
        ppo, g = self.config.ppo, self.config.ppo.samples_per_prompt
        kept, dropped, rounds = [], [], 1
        while True:
            signal = informative_groups(batch.scores.total, g).tolist()
            for i, informative in enumerate(signal):
                (kept if informative else dropped).append(batch.rows(list(range(i * g, (i + 1) * g))))
            if len(kept) >= ppo.prompts_per_step or rounds >= ppo.max_sampling_rounds:
                break
            # Only as many prompts as groups are missing (the engines serve the newest weights now).
            batch = self._collect(*self._submit(step, ppo.prompts_per_step - len(kept), rounds))
            rounds += 1
        groups = (kept + dropped)[:ppo.prompts_per_step]
        out = Rollouts.concat(groups)
        out.rounds, out.dropped_groups = rounds, len(dropped)
        return out
