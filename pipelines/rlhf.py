"""`raylm rlhf`: PPO (or critic-free GRPO / RLOO) over separate Ray actor pools.

Pools, sized independently (placement in one place: ``place_pools``):

- policy: a trainer group of ``policy.num_workers`` ranks, one torch.distributed group, FSDP2;
- critic: a trainer group holding the value model (PPO with GAE only);
- rollout: ``rollout.num_engines`` generation engines (vLLM; raylm's KV-cache generator where vLLM
  cannot be installed, said in the log);
- reward: reward-model scorers; reference: the frozen starting policy.

Each step, in this order (``ppo_step``): sample prompts -> rollouts (each records the policy version
that produced it) -> reward-model scores -> reference log-probs (and the policy's own and the
critic's values) -> KL-penalised rewards -> advantages (GAE, or group baselines) -> PPO clipped
policy loss and value loss over ``ppo.epochs`` epochs of ``ppo.minibatches`` minibatches -> the new
weights are published once to the object store in buckets and every engine loads them. Every
remote wait has a timeout (``timeouts``).

Before the first and after the last step, policy samples on fixed prompts are scored by the reward
model and by the ground truth (word-overlap F1 with the function's real docstring line), with the
KL to the reference; per-step metrics and the final policy (``<output_dir>/hf``) go to MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from raylm.config import ConfigError, Section, StageConfig
from raylm.tracking import Progress, StageRun

log = logging.getLogger("raylm.rlhf")

ROLES = ("policy", "critic", "rollout", "reward", "reference")
Role = Literal["policy", "critic", "rollout", "reward", "reference"]


# ---- configuration ------------------------------------------------------------------------------

class PolicyConfig(Section):
    checkpoint: str = "out/sft/hf"  # a causal-LM Hugging Face folder with its tokenizer.json (raylm sft output)
    num_workers: int = Field(default=2, ge=1)  # ranks of the FSDP2 policy group
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)


class CriticConfig(Section):
    checkpoint: str | None = None  # None: start from the reward model (its head included)
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    lr: float = Field(default=5e-5, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)


class RolloutConfig(Section):
    backend: Literal["auto", "vllm", "torch"] = "auto"  # auto: vLLM where it imports
    num_engines: int = Field(default=1, ge=1)
    cpus_per_engine: float = Field(default=0.5, gt=0)
    gpus_per_engine: float = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    gpu_memory_utilization: float = Field(default=0.1, gt=0, lt=1)  # vLLM on CPU: the share of host RAM for its KV cache
    bucket_mb: float = Field(default=64, gt=0)  # weight publication: tensors packed into buckets of this size


class RewardConfig(Section):
    checkpoint: str = "out/reward/hf"  # a *ForSequenceClassification folder (raylm reward output)
    num_actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=0.25, gt=0)
    gpus_per_actor: float = Field(default=0, ge=0)
    normalize: bool = True  # (score - running mean) / running std
    clip: float | None = Field(default=5.0, gt=0)  # then clip to +-clip; None: no clipping


class ReferenceConfig(Section):
    checkpoint: str | None = None  # None: the policy's starting checkpoint
    num_actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=0.25, gt=0)
    gpus_per_actor: float = Field(default=0, ge=0)


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = "k1"
    mode: Literal["reward", "loss"] = "reward"  # a per-token reward penalty, or a term of the policy loss
    coef: float = Field(default=0.05, ge=0)
    adaptive: bool = False  # Ziegler et al.'s controller: move coef so the KL tracks target
    target: float = Field(default=1.0, gt=0)  # nats per response (summed over its tokens)
    horizon: float = Field(default=10000, gt=0)


class PPOConfig(Section):
    steps: int = Field(default=20, ge=1)
    prompts_per_step: int = Field(default=16, ge=1)
    samples_per_prompt: int = Field(default=1, ge=1)  # >= 2 for group baselines
    advantage: Literal["gae", "grpo", "rloo"] = "gae"  # grpo / rloo: critic-free group baselines
    epochs: int = Field(default=2, ge=1)
    minibatches: int = Field(default=2, ge=1)  # optimizer steps per epoch
    clip_eps: float = Field(default=0.2, gt=0)
    value_clip_eps: float | None = Field(default=0.2, gt=0)  # None: unclipped value loss
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    whiten_advantages: bool = True
    entropy_coef: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _groups(self):
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: {self.advantage} compares samples of one prompt: needs >= 2")
        return self


class DataConfig(Section):
    builtin: Literal["stdlib"] | None = "stdlib"  # "What does `f(sig)` do?" -> f's docstring line (raylm.preference_data)
    prompts: str | None = None  # or a JSONL file of {"prompt": str, "reference": str (optional)}
    limit: int | None = Field(default=None, ge=2)  # functions of the built-in task (evenly spread), None: all
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # the built-in task's held-out split
    max_prompt_tokens: int = Field(default=96, ge=4)  # longer prompts are left out
    tokenizer: str | None = None  # default: the policy checkpoint's tokenizer.json


class EvalConfig(Section):
    prompts: int = Field(default=32, ge=0)  # fixed prompts sampled before and after training (0: skip)
    samples_per_prompt: int = Field(default=4, ge=1)


class PlacementConfig(Section):
    # Roles listed together are co-placed: actor i of each goes into bundle i of one placement group.
    colocate: list[list[Role]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _roles_once(self):
        seen = [r for group in self.colocate for r in group]
        if len(seen) != len(set(seen)):
            raise ValueError("colocate: a role appears in more than one group")
        return self


class TimeoutConfig(Section):
    remote_s: float = Field(default=600, gt=0)  # any single remote call (a rollout batch, an update)
    startup_s: float = Field(default=900, gt=0)  # actors and engines starting, placement groups


class Config(StageConfig):
    output_dir: str = "out/rlhf"
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)

    @model_validator(mode="after")
    def _shapes(self):
        ppo = self.ppo
        rollouts = ppo.prompts_per_step * ppo.samples_per_prompt
        groups = [("policy", self.policy.num_workers)] + ([("critic", self.critic.num_workers)] if self.uses_critic else [])
        for role, workers in groups:
            if rollouts % (workers * ppo.minibatches):
                raise ValueError(f"ppo: {rollouts} rollouts per step (prompts_per_step x samples_per_prompt) do not "
                                 f"split into {role}.num_workers ({workers}) x ppo.minibatches ({ppo.minibatches}) "
                                 "equal parts")
        if self.data.builtin is None and self.data.prompts is None:
            raise ValueError("data: give prompts (a JSONL file) or builtin: stdlib")
        return self

    @property
    def uses_critic(self) -> bool:
        return self.ppo.advantage == "gae"

    @property
    def reference_checkpoint(self) -> str:
        return self.reference.checkpoint or self.policy.checkpoint

    @property
    def critic_checkpoint(self) -> str:
        return self.critic.checkpoint or self.reward.checkpoint

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.data.tokenizer) if self.data.tokenizer else Path(self.policy.checkpoint) / "tokenizer.json"


def _hf_config(folder: str, key: str, config_path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ConfigError(f"{config_path}: {key}: {folder} is not a Hugging Face checkpoint folder (no config.json)")
    return json.loads(path.read_text())


def check(config: Config, config_path) -> None:
    """Before any Ray work: the checkpoints exist, are of the right kind and share a vocabulary."""
    policy = _hf_config(config.policy.checkpoint, "policy.checkpoint", config_path)
    reward = _hf_config(config.reward.checkpoint, "reward.checkpoint", config_path)
    if any(a.endswith("ForSequenceClassification") for a in policy.get("architectures", [])):
        raise ConfigError(f"{config_path}: policy.checkpoint: {config.policy.checkpoint} is a scalar-head model, "
                          "not a causal LM")
    if not any(a.endswith("ForSequenceClassification") for a in reward.get("architectures", [])):
        raise ConfigError(f"{config_path}: reward.checkpoint: {config.reward.checkpoint} is not a reward model "
                          "(no *ForSequenceClassification architecture; `raylm reward` writes one)")
    reference = _hf_config(config.reference_checkpoint, "reference.checkpoint", config_path)
    keys = [("reward.checkpoint", reward), ("reference.checkpoint", reference)]
    if config.uses_critic:
        keys.append(("critic.checkpoint", _hf_config(config.critic_checkpoint, "critic.checkpoint", config_path)))
    for key, hf in keys:
        if hf.get("vocab_size") != policy.get("vocab_size"):
            raise ConfigError(f"{config_path}: {key}: vocabulary {hf.get('vocab_size')} differs from the policy's "
                              f"{policy.get('vocab_size')} (the models must share a tokenizer)")
    if not config.tokenizer_file.exists():
        raise ConfigError(f"{config_path}: data.tokenizer: {config.tokenizer_file} not found")
    if config.data.prompts is not None and not Path(config.data.prompts).is_file():
        raise ConfigError(f"{config_path}: data.prompts: {config.data.prompts} is not a file")
    if config.data.max_prompt_tokens + config.rollout.max_new_tokens > policy.get("max_position_embeddings", 10**9):
        raise ConfigError(f"{config_path}: rollout.max_new_tokens: data.max_prompt_tokens + max_new_tokens exceeds "
                          f"the policy's max_position_embeddings ({policy['max_position_embeddings']})")


# ---- the task: prompts, chat format, ground truth -----------------------------------------------

class Task:
    """Prompts in the chat format the policy was fine-tuned on, what the reward model reads, and the
    ground truth (word-overlap F1 with the reference answer, where the prompts carry one)."""

    def __init__(self, config: Config):
        from raylm.sft_data import ChatTemplate

        self.template = ChatTemplate(config.tokenizer_file)
        self.stop_ids = [self.template.end_id]
        self.train, self.held_out = self.load(config)
        if not self.train:
            raise ConfigError(f"data: no prompt of at most {config.data.max_prompt_tokens} tokens")

    def load(self, config: Config) -> tuple[list[dict], list[dict]]:
        data = config.data
        if data.prompts is not None:
            lines = Path(data.prompts).read_text(encoding="utf-8").splitlines()
            items, held_out = [json.loads(line) for line in lines if line.strip()], []
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ConfigError(f"{data.prompts}:{i + 1}: 'prompt': must be a string")
        else:
            from raylm.preference_data import stdlib_prompts

            items = stdlib_prompts("train", data.limit, data.validation_fraction, config.seed)
            held_out = stdlib_prompts("validation", data.limit, data.validation_fraction, config.seed)
        keep = []
        for subset in (items, held_out):
            out = []
            for item in subset:
                ids = self.prompt_ids(item)
                if len(ids) <= data.max_prompt_tokens:
                    out.append({**item, "ids": ids})
            keep.append(out)
        return keep[0], keep[1]

    def prompt_ids(self, item: dict) -> list[int]:
        return self.template.prompt([{"role": "user", "content": item["prompt"]}])

    def reward_sequence(self, prompt_ids: list[int], response: list[int]) -> list[int]:
        """The conversation as the reward model was trained on it: ... response <|end|> <|eos|>."""
        from raylm.tokenizer import EOS_ID

        closed = response if response and response[-1] == self.template.end_id else response + [self.template.end_id]
        return prompt_ids + closed + [EOS_ID]

    def text(self, response: list[int]) -> str:
        return self.template.tokenizer.decode([t for t in response if t != self.template.end_id])

    def ground_truth(self, item: dict, response: list[int]) -> float | None:
        from raylm.preference_data import reference_score

        if not item.get("reference"):
            return None
        return reference_score(self.text(response), item["reference"])


class PromptSampler:
    """Epochs over the prompts, each a fresh seeded shuffle."""

    def __init__(self, items: list[dict], seed: int):
        self.items, self.rng = items, np.random.default_rng(seed)
        self.order, self.position = self.rng.permutation(len(items)), 0

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.order, self.position = self.rng.permutation(len(self.items)), 0
            out.append(self.items[self.order[self.position]])
            self.position += 1
        return out


# ---- the pools ----------------------------------------------------------------------------------

def role_shapes(config: Config) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, CPUs per actor, GPUs per actor)."""
    shapes = {
        "policy": (config.policy.num_workers, config.policy.cpus_per_worker, config.policy.gpus_per_worker),
        "rollout": (config.rollout.num_engines, config.rollout.cpus_per_engine, config.rollout.gpus_per_engine),
        "reward": (config.reward.num_actors, config.reward.cpus_per_actor, config.reward.gpus_per_actor),
        "reference": (config.reference.num_actors, config.reference.cpus_per_actor, config.reference.gpus_per_actor),
    }
    if config.uses_critic:
        shapes["critic"] = (config.critic.num_workers, config.critic.cpus_per_worker, config.critic.gpus_per_worker)
    return shapes


def place_pools(config: Config) -> tuple[dict[str, list], list]:
    """The one place that decides where actors run: one placement group per set of co-placed roles
    (``placement.colocate``) and one per remaining role; actor i of a role takes bundle i, whose size
    is the sum of what the co-placed roles' i-th actors ask for. -> (role -> scheduling strategy
    per actor, the placement groups)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    shapes = role_shapes(config)
    groups = [[r for r in group if r in shapes] for group in config.placement.colocate]
    placed = {r for group in groups for r in group}
    groups = [g for g in groups if g] + [[r] for r in shapes if r not in placed]
    strategies, pgs = {}, []
    for group in groups:
        n = max(shapes[r][0] for r in group)
        bundles = []
        for i in range(n):
            cpus = sum(shapes[r][1] for r in group if i < shapes[r][0])
            gpus = sum(shapes[r][2] for r in group if i < shapes[r][0])
            bundles.append({"CPU": cpus, **({"GPU": gpus} if gpus else {})})
        pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=config.timeouts.startup_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"placement group {'+'.join(group)} ({bundles}) was not placed within "
                               f"{config.timeouts.startup_s:.0f} s: the cluster lacks the resources") from None
        pgs.append(pg)
        for r in group:
            strategies[r] = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in range(shapes[r][0])]
    return strategies, pgs


def wait(refs, timeout_s: float, what: str):
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from None


def split_evenly(items: list, n: int) -> list[list]:
    per, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + per + (i < extra)
        out.append(items[start:end])
        start = end
    return out


@dataclass
class Pools:
    """Every actor of the run, by role; methods fan work out over a pool and wait with a timeout."""

    config: Config
    policy: object  # TrainerGroup
    critic: object | None
    engines: list
    reward: list
    reference: list
    backend: str
    placement_groups: list = field(default_factory=list)

    @classmethod
    def start(cls, config: Config) -> "Pools":
        import ray

        from raylm.actors.generation_engine import VLLMEngine, TorchEngine, vllm_available
        from raylm.actors.policy_trainer import PolicyTrainer
        from raylm.actors.reference_model import ReferenceModel
        from raylm.actors.reward_scorer import RewardScorer
        from raylm.actors.trainer_group import TrainerGroup
        from raylm.actors.value_trainer import ValueTrainer

        backend = config.rollout.backend
        if backend == "auto":
            backend = "vllm" if vllm_available() else "torch"
            if backend == "torch":
                msg = "vLLM is not installed here: the rollout pool uses raylm's own KV-cache generator"
                log.warning(msg)
                print(f"[rlhf] {msg}", flush=True)
        strategies, pgs = place_pools(config)
        startup = config.timeouts.startup_s
        ro, rw, rf = config.rollout, config.reward, config.reference
        # One token of room beyond the longest rollout, so that prompt_logprobs can score whole rollouts.
        positions = json.loads((Path(config.policy.checkpoint) / "config.json").read_text())["max_position_embeddings"]
        max_len = min(positions, config.data.max_prompt_tokens + ro.max_new_tokens + 1)
        engine_cls = VLLMEngine if backend == "vllm" else TorchEngine
        engine_kwargs = dict(dtype="float32", max_model_len=max_len, seed=config.seed)
        if backend == "vllm":
            engine_kwargs.update(gpu_memory_utilization=ro.gpu_memory_utilization)
        # Slow starts (vLLM engines) first, so that they overlap with the others.
        engines = [engine_cls.options(num_cpus=ro.cpus_per_engine, num_gpus=ro.gpus_per_engine,
                                      scheduling_strategy=strategies["rollout"][i])
                   .remote(str(Path(config.policy.checkpoint).resolve()), seed=config.seed + i,
                           **{k: v for k, v in engine_kwargs.items() if k != "seed"})
                   for i in range(ro.num_engines)]
        reward = [RewardScorer.options(num_cpus=rw.cpus_per_actor, num_gpus=rw.gpus_per_actor,
                                       scheduling_strategy=strategies["reward"][i])
                  .remote(str(Path(rw.checkpoint).resolve()), threads=max(1, int(rw.cpus_per_actor)),
                          use_gpu=rw.gpus_per_actor > 0)
                  for i in range(rw.num_actors)]
        reference = [ReferenceModel.options(num_cpus=rf.cpus_per_actor, num_gpus=rf.gpus_per_actor,
                                            scheduling_strategy=strategies["reference"][i])
                     .remote(str(Path(config.reference_checkpoint).resolve()), threads=max(1, int(rf.cpus_per_actor)),
                             use_gpu=rf.gpus_per_actor > 0)
                     for i in range(rf.num_actors)]
        p = config.policy
        policy = TrainerGroup("policy", PolicyTrainer, p.num_workers, strategies["policy"], p.cpus_per_worker,
                              p.gpus_per_worker, startup, seed=config.seed)
        critic = None
        if config.uses_critic:
            c = config.critic
            critic = TrainerGroup("critic", ValueTrainer, c.num_workers, strategies["critic"], c.cpus_per_worker,
                                  c.gpus_per_worker, startup, seed=config.seed + 1)
        wait([a.ready.remote() for a in engines + reward + reference], startup, "starting engines and models")
        return cls(config, policy, critic, engines, reward, reference, backend, pgs)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for group in (self.policy, self.critic):
            if group is not None:
                group.kill()
        for actor in self.engines + self.reward + self.reference:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)

    # -- what each pool does --

    def setup_trainers(self, config: Config) -> None:
        """(Re)load the policy and the critic from their starting checkpoints."""
        p = config.policy
        futures = [a.setup.remote(str(Path(p.checkpoint).resolve()), p.lr, p.weight_decay, grad_clip=p.grad_clip)
                   for a in self.policy.actors]
        if self.critic is not None:
            c = config.critic
            futures += [a.setup.remote(str(Path(config.critic_checkpoint).resolve()), c.lr, grad_clip=c.grad_clip)
                        for a in self.critic.actors]
        wait(futures, config.timeouts.startup_s, "loading the policy and critic")

    def generate(self, prompts: list[list[int]], stop_ids: list[int], temperature: float, seed: int | None = None,
                 max_new_tokens: int | None = None) -> list[dict]:
        ro = self.config.rollout
        chunks = split_evenly(prompts, len(self.engines))
        futures = [e.generate.remote(chunk, max_new_tokens=max_new_tokens or ro.max_new_tokens, temperature=temperature,
                                     top_p=ro.top_p, top_k=ro.top_k, seed=seed, logprobs=True, stop_token_ids=stop_ids)
                   for e, chunk in zip(self.engines, chunks) if chunk]
        return [r for part in wait(futures, self.config.timeouts.remote_s, "rollout") for r in part]

    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        chunks = split_evenly(sequences, len(self.reward))
        futures = [a.score.remote(chunk) for a, chunk in zip(self.reward, chunks) if chunk]
        return torch.tensor([s for part in wait(futures, self.config.timeouts.remote_s, "reward") for s in part])

    def reference_logprobs(self, batch: dict) -> torch.Tensor:
        shards = shard_batch(batch, len(self.reference))
        futures = [a.logprobs.remote(s) for a, s in zip(self.reference, shards)]
        return cat_padded(wait(futures, self.config.timeouts.remote_s, "reference"))

    def publish(self, version: int) -> dict:
        """The policy's weights, published once (bucketed) into the object store, loaded by every engine."""
        bucket_bytes = int(self.config.rollout.bucket_mb * 2**20)
        published = self.policy.run("publish_weights", bucket_bytes)[0]
        futures = [e.load_weight_buckets.remote(published["buckets"], version) for e in self.engines]
        load_s = wait(futures, self.config.timeouts.remote_s, "weight sync")
        versions = wait([e.version.remote() for e in self.engines], self.config.timeouts.remote_s, "engine versions")
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync: engines serve versions {versions}, expected {version}")
        return {"time/publish_s": published["seconds"], "time/engine_load_s": max(load_s),
                "weight_sync/bucket_count": len(published["buckets"]), "weight_sync/bytes": published["bytes"]}


# ---- batches ------------------------------------------------------------------------------------

def make_batch(prompts: list[list[int]], responses: list[list[int]]) -> dict:
    """Right-padded ``tokens`` [B, T] (prompt then response), ``prompt_lens`` [B], ``response_mask`` [B, R]."""
    width = max(1, max(len(r) for r in responses))
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.zeros(len(prompts), max(seq_len, 2), dtype=torch.long)
    mask = torch.zeros(len(prompts), width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(r)] = 1
    return {"tokens": tokens, "prompt_lens": torch.tensor([len(p) for p in prompts]), "response_mask": mask}


def pad_rows(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for i, row in enumerate(values):
        out[i, :len(row)] = torch.tensor(row[:width])
    return out


def shard_batch(batch: dict, n: int) -> list[dict]:
    """Contiguous equal-ish row slices, one per rank / actor."""
    sizes = [len(s) for s in split_evenly(list(range(len(batch["tokens"]))), n)]
    starts = np.cumsum([0] + sizes)
    return [{k: v[starts[i]:starts[i + 1]] for k, v in batch.items()} for i in range(n)]


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


# ---- evaluation ---------------------------------------------------------------------------------

def evaluate(pools: Pools, task: Task, items: list[dict], samples: int, temperature: float) -> dict:
    """Policy samples on fixed prompts: mean reward-model score, ground-truth score, KL to the
    reference (k1 summed over each response, from the engines' log-probs), response length."""
    if not items:
        return {}
    prompts = [item["ids"] for item in items for _ in range(samples)]
    owners = [item for item in items for _ in range(samples)]
    rollouts = pools.generate(prompts, task.stop_ids, temperature)
    responses = [r["tokens"] for r in rollouts]
    scores = pools.score([task.reward_sequence(p, r) for p, r in zip(prompts, responses)])
    batch = make_batch(prompts, responses)
    ref = pools.reference_logprobs(batch)
    policy_lp = pad_rows([r["logprobs"] for r in rollouts], batch["response_mask"].shape[1])
    kl = ((policy_lp - ref) * batch["response_mask"]).sum(-1)
    truth = [task.ground_truth(o, r) for o, r in zip(owners, responses)]
    truth = [t for t in truth if t is not None]
    return {"reward": scores.mean().item(), "ground_truth": float(np.mean(truth)) if truth else None,
            "kl": kl.mean().item(), "response_len": float(np.mean([len(r) for r in responses])),
            "samples": [{"prompt": o["prompt"], "response": task.text(r), "reference": o.get("reference"),
                         "reward": s} for o, r, s in zip(owners[::samples], responses[::samples], scores[::samples].tolist())]}


# ---- the PPO step -------------------------------------------------------------------------------

@dataclass
class RunState:
    version: int = 0
    kl_ctl: object = None
    moments: object = None


def ppo_step(config: Config, pools: Pools, task: Task, sampler: PromptSampler, state: RunState, step: int) -> dict:
    from raylm.ppo import (
        gae,
        group_advantages,
        kl_estimate,
        kl_penalised_rewards,
        masked_mean,
        normalise_scores,
        whiten,
    )

    ppo, kl_cfg, timeout = config.ppo, config.kl, config.timeouts.remote_s
    times, started = {}, time.perf_counter()

    # 1. sample prompts
    items = sampler.next(ppo.prompts_per_step)
    owners = [item for item in items for _ in range(ppo.samples_per_prompt)]  # a prompt's samples are consecutive
    prompts = [item["ids"] for item in owners]

    # 2. rollouts, each stamped with the policy version that produced it
    t = time.perf_counter()
    rollouts = pools.generate(prompts, task.stop_ids, config.rollout.temperature)
    times["time/rollout_s"] = time.perf_counter() - t
    versions = {r["policy_version"] for r in rollouts}
    if versions != {state.version}:
        raise RuntimeError(f"step {step}: rollouts from policy versions {sorted(versions)}, expected {state.version}")
    responses = [r["tokens"] for r in rollouts]
    batch = make_batch(prompts, responses)
    mask = batch["response_mask"]
    engine_logprobs = pad_rows([r["logprobs"] for r in rollouts], mask.shape[1])

    # 3. rewards (and the ground truth, for the record only)
    t = time.perf_counter()
    scores = pools.score([task.reward_sequence(p, r) for p, r in zip(prompts, responses)])
    times["time/reward_s"] = time.perf_counter() - t
    truth = [x for x in (task.ground_truth(o, r) for o, r in zip(owners, responses)) if x is not None]

    # 4. reference log-probs; the policy's own log-probs and the critic's values of the same tokens
    t = time.perf_counter()
    ref_futures = [a.logprobs.remote(s) for a, s in zip(pools.reference, shard_batch(batch, len(pools.reference)))]
    policy_futures = pools.policy.submit_sharded("logprobs", shard_batch(batch, pools.policy.world_size))
    critic_futures = (pools.critic.submit_sharded("values", shard_batch(batch, pools.critic.world_size))
                      if pools.critic is not None else [])
    ref_logprobs = cat_padded(wait(ref_futures, timeout, "reference"))
    old_logprobs = cat_padded(wait(policy_futures, timeout, "policy.logprobs"))
    values = cat_padded(wait(critic_futures, timeout, "critic.values")) if critic_futures else None
    times["time/logprobs_s"] = time.perf_counter() - t

    # 5. KL-penalised rewards
    kl = kl_estimate(old_logprobs, ref_logprobs, kl_cfg.estimator) * mask
    kl_per_response = kl.sum(-1)
    normalised = normalise_scores(scores, state.moments, config.reward.clip)
    penalty = state.kl_ctl.value if kl_cfg.mode == "reward" else 0.0

    # 6. advantages: GAE over the critic's values, or a group baseline over each prompt's samples
    if config.uses_critic:
        rewards = kl_penalised_rewards(normalised, kl, mask, penalty)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    else:
        sequence_rewards = normalised - penalty * kl_per_response
        advantages = group_advantages(sequence_rewards, ppo.samples_per_prompt, ppo.advantage)[:, None] * mask
        returns = None
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask)

    # 7. PPO: clipped policy loss (and the value loss) over epochs of minibatches, policy and critic at once
    t = time.perf_counter()
    train_batch = {**batch, "old_logprobs": old_logprobs, "advantages": advantages, "ref_logprobs": ref_logprobs}
    kl_loss_coef = state.kl_ctl.value if kl_cfg.mode == "loss" else 0.0
    policy_futures = pools.policy.submit_sharded(
        "update", shard_batch(train_batch, pools.policy.world_size), epochs=ppo.epochs, minibatches=ppo.minibatches,
        clip_eps=ppo.clip_eps, entropy_coef=ppo.entropy_coef, kl_loss_coef=kl_loss_coef,
        kl_estimator=kl_cfg.estimator, step=step)
    critic_futures = []
    if pools.critic is not None:
        critic_batch = {**batch, "old_values": values, "returns": returns}
        critic_futures = pools.critic.submit_sharded(
            "update", shard_batch(critic_batch, pools.critic.world_size), epochs=ppo.epochs,
            minibatches=ppo.minibatches, value_clip_eps=ppo.value_clip_eps, step=step)
    metrics = mean_dicts(wait(policy_futures, timeout, "policy.update"))
    if critic_futures:
        metrics.update(mean_dicts(wait(critic_futures, timeout, "critic.update")))
    times["time/update_s"] = time.perf_counter() - t

    # 8. publish the new weights once; every engine loads them and serves the new version
    t = time.perf_counter()
    state.version += 1
    metrics.update(pools.publish(state.version))
    times["time/weight_sync_s"] = time.perf_counter() - t

    mean_kl = kl_per_response.mean().item()
    kl_coef = state.kl_ctl.value
    state.kl_ctl.update(mean_kl, len(prompts))
    metrics.update(times)
    metrics.update({
        "reward/mean": scores.mean().item(), "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "reward/normalised_mean": normalised.mean().item(),
        "ground_truth/mean": float(np.mean(truth)) if truth else None,
        "kl/mean": mean_kl, "kl/per_token": masked_mean(kl, mask).item(), "kl/coef": kl_coef,
        "advantages/mean": masked_mean(advantages, mask).item(),
        "response/length": mask.sum(-1).mean().item(),
        "rollout/logprob_diff_vs_trainer": masked_mean((engine_logprobs - old_logprobs).abs(), mask).item(),
        "policy_version": state.version, "rollout/policy_version": state.version - 1,
        "time/step_s": time.perf_counter() - started,
    })
    if values is not None:
        metrics["critic/values_mean"] = masked_mean(values, mask).item()
    return metrics


def mean_dicts(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


# ---- the stage ----------------------------------------------------------------------------------

def run(config: Config, stage_run: StageRun) -> dict:
    from raylm.ray_init import init_ray

    init_ray(config.ray)
    task = Task(config)
    pools = Pools.start(config)
    try:
        return train(config, stage_run, pools, task)
    finally:
        pools.shutdown()


def train(config: Config, stage_run: StageRun, pools: Pools, task: Task) -> dict:
    """The whole run on pools that are already up (tests start the pools once and train twice)."""
    from raylm.ppo import AdaptiveKLController, FixedKLController, RunningMoments

    started = time.perf_counter()
    stage_run.set_tags({"raylm.rollout_backend": pools.backend})
    print(f"[rlhf] rollout backend: {pools.backend}; {len(task.train)} training prompts, "
          f"{len(task.held_out)} held out", flush=True)
    pools.setup_trainers(config)
    state = RunState()
    state.kl_ctl = (AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon) if config.kl.adaptive
                    else FixedKLController(config.kl.coef))
    state.moments = RunningMoments() if config.reward.normalize else None
    # Version 0 is the trainer's own copy of the starting weights: engines and trainer agree from the start.
    initial_sync = pools.publish(0)
    stage_run.log_metrics({f"initial_{k}": v for k, v in initial_sync.items()}, step=0)

    eval_items = task.train[:config.eval.prompts]
    held_out = task.held_out[:config.eval.prompts]
    before = evaluate(pools, task, eval_items, config.eval.samples_per_prompt, config.rollout.temperature)
    before_held_out = evaluate(pools, task, held_out, config.eval.samples_per_prompt, config.rollout.temperature)
    log_eval(stage_run, "before", before, before_held_out, step=0)

    sampler = PromptSampler(task.train, config.seed)
    progress = Progress(config.ppo.steps, "rlhf")
    history = []
    for step in range(1, config.ppo.steps + 1):
        metrics = ppo_step(config, pools, task, sampler, state, step)
        history.append(metrics)
        stage_run.log_metrics(metrics, step=step)
        progress.update(step, reward=metrics["reward/mean"], truth=metrics["ground_truth/mean"] or 0.0,
                        kl=metrics["kl/mean"], pg=metrics["policy/loss"], clip=metrics["policy/clip_fraction"],
                        sync_s=metrics["time/weight_sync_s"])

    after = evaluate(pools, task, eval_items, config.eval.samples_per_prompt, config.rollout.temperature)
    after_held_out = evaluate(pools, task, held_out, config.eval.samples_per_prompt, config.rollout.temperature)
    log_eval(stage_run, "after", after, after_held_out, step=config.ppo.steps)

    export_dir = (config.output_path / "hf").resolve()
    pools.policy.run("save", str(export_dir), str(config.tokenizer_file.resolve()))
    stage_run.log_artifact(export_dir, "model")
    wall = time.perf_counter() - started
    summary = {
        "checkpoint": str(export_dir), "steps": config.ppo.steps, "rollout_backend": pools.backend,
        "policy_version": state.version, "wall_s": wall,
        "before": strip_samples(before), "after": strip_samples(after),
        "before_held_out": strip_samples(before_held_out), "after_held_out": strip_samples(after_held_out),
        "logprob_diff_vs_trainer": float(np.mean([m["rollout/logprob_diff_vs_trainer"] for m in history])),
        "weight_sync_s": float(np.mean([m["time/weight_sync_s"] for m in history])),
        "max_kl": float(max(m["kl/mean"] for m in history)),
        "history": [{k: m[k] for k in ("reward/mean", "ground_truth/mean", "kl/mean", "policy/loss",
                                       "policy/clip_fraction")} for m in history],
    }
    stage_run.log_metrics({"wall_s": wall})
    stage_run.log_dict(summary, "summary.json")
    if after:
        stage_run.log_text(samples_text(before, after), "samples.txt")
    print(f"[rlhf] reward {fmt(before.get('reward'))} -> {fmt(after.get('reward'))}, ground truth "
          f"{fmt(before.get('ground_truth'))} -> {fmt(after.get('ground_truth'))}, KL to reference "
          f"{fmt(after.get('kl'))}; wrote {export_dir}", flush=True)
    return summary


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def strip_samples(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "samples"}


def log_eval(stage_run: StageRun, when: str, train_eval: dict, held_out: dict, step: int) -> None:
    metrics = {}
    for prefix, result in (("eval", train_eval), ("eval_held_out", held_out)):
        for key in ("reward", "ground_truth", "kl", "response_len"):
            if result.get(key) is not None:
                metrics[f"{prefix}/{key}_{when}"] = result[key]
    stage_run.log_metrics(metrics, step=step)


def samples_text(before: dict, after: dict) -> str:
    lines = []
    for b, a in zip(before["samples"], after["samples"]):
        lines += [f"prompt:    {b['prompt']}", f"reference: {b['reference']}",
                  f"before:    {b['response']}  (reward {b['reward']:.3f})",
                  f"after:     {a['response']}  (reward {a['reward']:.3f})", ""]
    return "\n".join(lines)
