"""Every actor of an RLHF run, by role, placed once (``raylm.rl.placement``):

- policy: a trainer group of ``policy.num_workers`` ranks, one torch.distributed group, FSDP2;
- critic: a trainer group holding the value model (PPO with GAE only);
- rollout: ``rollout.num_engines`` generation engines (vLLM; raylm's KV-cache generator where vLLM
  cannot be installed or cannot serve the policy's adapters, said in the log);
- reward: reward-model scorers; reference: the frozen starting policy.

A rollout engine, reward scorer or reference actor that dies is replaced in its placement bundle
(an engine gets the last published weights) and its work retried (``ActorPool``). A trainer group
that loses a rank is replaced whole, in the same bundles with a new rendezvous
(``replace_trainer_group``); the driver then reloads the newest checkpoint (``pipelines/rlhf.py``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray.actor import ActorHandle

from raylm.actors.policy_trainer import PolicyGroup
from raylm.actors.rule_reward import RuleRewardPool
from raylm.actors.trainer_group import TrainerGroup, TrainerRankDied
from raylm.actors.value_trainer import CriticGroup
from raylm.config import ConfigError
from raylm.rl.actor_pool import ActorPool, InFlight
from raylm.rl.batching import cat_padded, shard_batch, split_evenly
from raylm.rl.config import Config
from raylm.rl.placement import Placement, place
from raylm.rl.remote import wait
from raylm.rl.weight_sync import WeightSync

log = logging.getLogger("raylm.rlhf")


def rollout_backend(config: Config) -> str:
    from raylm.actors.generation_engine import vllm_available

    backend = config.rollout.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() and config.peft.method != "bottleneck" else "torch"
        if backend == "torch":
            why = ("vLLM cannot serve bottleneck adapters" if config.peft.method == "bottleneck"
                   else "vLLM is not installed here")
            msg = f"{why}: the rollout pool uses raylm's own KV-cache generator"
            log.warning(msg)
            print(f"[rlhf] {msg}", flush=True)
    return backend


def start_engine(config: Config, backend: str, strategy) -> ActorHandle:
    from raylm.actors.generation_engine import TorchEngine, VLLMEngine

    ro, i = config.rollout, strategy.placement_group_bundle_index
    # One token of room beyond the longest rollout, so that prompt_logprobs can score whole rollouts.
    positions = json.loads((Path(config.policy.checkpoint) / "config.json").read_text())["max_position_embeddings"]
    longest = config.data.max_prompt_tokens + config.soft_prompt_tokens + ro.max_new_tokens + 1
    kwargs = dict(dtype="float32", max_model_len=min(positions, longest), seed=config.seed + i)
    if backend == "vllm":
        kwargs.update(gpu_memory_utilization=ro.gpu_memory_utilization, soft_prompt_tokens=config.soft_prompt_tokens)
        if config.uses_lora:
            kwargs.update(max_lora_rank=config.peft.rank)
    elif config.uses_lora:
        raise ConfigError("peft.method: lora needs the vLLM rollout backend, and vLLM is not installed here")
    elif config.uses_adapter:
        kwargs.update(peft=config.peft)
    engine_cls = VLLMEngine if backend == "vllm" else TorchEngine
    return engine_cls.options(num_cpus=ro.cpus_per_engine, num_gpus=ro.gpus_per_engine,
                              scheduling_strategy=strategy).remote(str(Path(config.policy.checkpoint).resolve()),
                                                                   **kwargs)


def start_reward_scorer(config: Config, strategy) -> ActorHandle:
    from raylm.actors.reward_scorer import RewardScorer

    rw = config.reward
    return RewardScorer.options(num_cpus=rw.cpus_per_actor, num_gpus=rw.gpus_per_actor,
                                scheduling_strategy=strategy).remote(
        str(Path(rw.checkpoint).resolve()), threads=max(1, int(rw.cpus_per_actor)), use_gpu=rw.gpus_per_actor > 0)


def start_reference(config: Config, strategy) -> ActorHandle:
    from raylm.actors.reference_model import ReferenceModel

    rf = config.reference
    return ReferenceModel.options(num_cpus=rf.cpus_per_actor, num_gpus=rf.gpus_per_actor,
                                  scheduling_strategy=strategy).remote(
        str(Path(config.reference_checkpoint).resolve()), threads=max(1, int(rf.cpus_per_actor)),
        use_gpu=rf.gpus_per_actor > 0)


@dataclass
class Pools:
    config: Config
    backend: str
    placement: Placement
    weights: WeightSync
    rollout: ActorPool = None
    reward: ActorPool | None = None  # reward-model scorers (none with reward.checkpoint: null)
    rules: RuleRewardPool | None = None  # rule / function rewards (reward.rule)
    reference: ActorPool = None
    policy: PolicyGroup = None
    critic: CriticGroup | None = None
    replacements: list[tuple[str, int]] = field(default_factory=list)  # (role, index) of every actor replaced

    @classmethod
    def start(cls, config: Config) -> "Pools":
        pools = cls(config, rollout_backend(config), place(config), WeightSync(config))
        strategies, t = pools.placement.strategies, config.timeouts

        def pool(role: str, start, size: int, on_replace=None) -> ActorPool:
            return ActorPool(role, lambda i: start(strategies[role][i]), size, config.faults.max_actor_restarts,
                             t.remote_s, t.startup_s, pools.replacements, on_replace)

        # Slow starts (vLLM engines) first, so that they overlap with the others.
        pools.rollout = pool("rollout", lambda s: start_engine(config, pools.backend, s), config.rollout.num_engines,
                             on_replace=pools.weights.reload)
        if config.reward.checkpoint is not None:
            pools.reward = pool("reward", lambda s: start_reward_scorer(config, s), config.reward.num_actors)
        if config.reward.rule is not None:
            pools.rules = RuleRewardPool(config.rule_spec, config.reward.rule_actors, timeout_s=config.reward.rule_timeout_s,
                                         start_timeout_s=t.startup_s)
        pools.reference = pool("reference", lambda s: start_reference(config, s), config.reference.num_actors)
        pools.policy = pools.start_trainer_group("policy")
        if config.uses_critic:
            pools.critic = pools.start_trainer_group("critic")
        scorers = pools.reward.ready() if pools.reward is not None else []
        wait(pools.rollout.ready() + scorers + pools.reference.ready(), t.startup_s, "starting engines and models")
        return pools

    def start_trainer_group(self, role: str) -> TrainerGroup:
        """The policy's or the critic's ranks, in the role's placement bundles, joined in a new group."""
        config, t = self.config, self.config.timeouts
        group_cls, section, seed = ((PolicyGroup, config.policy, config.seed) if role == "policy"
                                    else (CriticGroup, config.critic, config.seed + 1))
        return group_cls(section.num_workers, self.placement.strategies[role], section.cpus_per_worker,
                         section.gpus_per_worker, t.startup_s, t.remote_s, seed=seed)

    def replace_trainer_group(self, died: TrainerRankDied, max_restarts: int) -> None:
        """Kill the rest of the dead rank's group (its survivors wait in a collective with the dead
        rank) and start a fresh group in its bundles, at most ``max_restarts`` times per group over
        the run; the new ranks are not set up."""
        done = sum(1 for role, _ in self.replacements if role == died.group)
        if done >= max_restarts:
            raise RuntimeError(f"{died}; the {died.group} group was already replaced {done} times "
                               f"(faults.max_trainer_restarts: {max_restarts})") from died
        msg = f"{died}: replacing the {died.group} group ({done + 1}/{max_restarts})"
        log.warning(msg)
        print(f"[rlhf] {msg}", flush=True)
        getattr(self, died.group).kill()
        setattr(self, died.group, self.start_trainer_group(died.group))
        self.replacements.append((died.group, died.rank))

    def shutdown(self) -> None:
        for group in (self.policy, self.critic, self.rollout, self.reward, self.reference):
            if group is not None:
                group.kill()
        if self.rules is not None:
            self.rules.shutdown()
        self.placement.remove()

    def setup_trainers(self, config: Config) -> dict:
        """(Re)load the policy and the critic from their starting checkpoints. -> the policy's
        parameter counts (all, and those that train)."""
        from raylm.train.spec import Freeze

        p = config.policy
        peft = config.peft.model_copy() if config.peft.method != "none" else None
        freeze = (Freeze(config.freeze.train_layers, config.freeze.train_from)
                  if config.freeze.train_layers is not None else None)
        policy = self.policy.setup(str(Path(p.checkpoint).resolve()), p.lr, p.weight_decay, p.grad_clip, peft, freeze)
        critic = (self.critic.setup(str(Path(config.critic_checkpoint).resolve()), config.critic.lr,
                                    grad_clip=config.critic.grad_clip) if self.critic is not None else None)
        counts = policy.result()
        if critic is not None:
            critic.result()
        return {f"policy/{k}": v for k, v in counts.items()}

    def publish(self, version: int) -> dict:
        """The policy's current weights become ``version`` on every engine (``WeightSync``)."""
        return self.weights.publish(self.policy, self.rollout, version)

    def generate(self, prompts: list[list[int]], stop_ids: list[int], temperature: float,
                 seeds: list[int] | None = None, max_new_tokens: int | None = None) -> list[dict]:
        """Rollouts (each ``{"tokens", "logprobs", "policy_version", ...}``); ``seeds``: one per prompt
        (None: each engine's own stream)."""
        return self.collect_rollouts(self.submit_rollouts(prompts, stop_ids, temperature, seeds, max_new_tokens))

    def submit_rollouts(self, prompts: list[list[int]], stop_ids: list[int], temperature: float,
                        seeds: list[int] | None = None, max_new_tokens: int | None = None) -> InFlight:
        """``generate`` without waiting: each engine serves its calls in order, so rollouts submitted
        before a weight publication are generated with the weights before it."""
        ro, n = self.config.rollout, len(self.rollout)
        seed_chunks = split_evenly(seeds, n) if seeds is not None else [None] * n
        shards = [(c, s) if c else None for c, s in zip(split_evenly(prompts, n), seed_chunks)]

        def call(engine, shard):
            return engine.generate.remote(shard[0], seed=shard[1], max_new_tokens=max_new_tokens or ro.max_new_tokens,
                                          temperature=temperature, top_p=ro.top_p, top_k=ro.top_k, logprobs=True,
                                          stop_token_ids=stop_ids)

        return self.rollout.submit(call, shards, "rollout")

    def collect_rollouts(self, flight: InFlight) -> list[dict]:
        return [r for part in self.rollout.collect(flight) if part is not None for r in part]

    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        """The reward model's score of each whole conversation."""
        shards = [c or None for c in split_evenly(sequences, len(self.reward))]
        parts = self.reward.fan_out(lambda scorer, chunk: scorer.score.remote(chunk), shards, "reward")
        return torch.tensor([s for part in parts if part is not None for s in part])

    def reference_logprobs(self, batch: dict, temperature: float) -> torch.Tensor:
        parts = self.reference.fan_out(lambda ref, shard: ref.logprobs.remote(shard, temperature=temperature),
                                       shard_batch(batch, len(self.reference)), "reference")
        return cat_padded(parts)
