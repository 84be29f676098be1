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

Log-probabilities (policy, reference, entropy) are those of softmax(logits / rollout.temperature),
the distribution the rollouts were sampled from; the engines report the same (vLLM's
``processed_logprobs``). Each rollout has its own sampling seed (from the run's seed and the step).

With a ``peft:`` method the policy trains adapters on its frozen base and each step only the
adapter travels to the engines: LoRA, which vLLM serves with its LoRA support on its base; a soft
prompt (``prompt_tuning``), which vLLM takes as input embeddings before each prompt's own; or
bottleneck adapters, which vLLM cannot serve, so the rollout pool is raylm's own generator with the
same adapters. ``freeze.train_layers`` trains only some blocks of the policy (full weights are
published).

Every ``checkpoint.every`` steps the run writes ``<output_dir>/checkpoints/step_N``: policy and
critic weights and optimizer states (torch DCP, each rank's RNG), and the driver's state (step,
policy version, KL coefficient, reward moments, prompt sampler position and RNG); a rerun on the
same output_dir resumes from the newest complete one. A rollout engine, reward scorer or reference
actor that dies is replaced in its placement bundle (an engine gets the last published weights)
and its work retried, at most ``faults.max_actor_restarts`` times per role.

Before the first and after the last step, policy samples on fixed prompts are scored by the reward
model and by the ground truth (word-overlap F1 with the function's real docstring line), with the
KL to the reference; per-step metrics and the final policy (``<output_dir>/hf``; a LoRA policy
merged, its adapter in ``hf/adapter``) go to MLflow.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from raylm.config import ConfigError, Section, StageConfig
from raylm.peft.config import PeftConfig
from raylm.train.config import FreezeConfig
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
    builtin: Literal["stdlib"] | None = "stdlib"  # "What does `f(sig)` do?" -> f's docstring line (raylm.data.preferences)
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


class CheckpointConfig(Section):
    every: int = Field(default=10, ge=0)  # steps between checkpoints under <output_dir>/checkpoints (0: none)
    keep: int = Field(default=2, ge=1)  # the newest ones kept
    resume: bool = True  # a rerun on the same output_dir continues from the newest complete checkpoint


class FaultConfig(Section):
    # A rollout engine, reward scorer or reference actor that dies is replaced (same placement bundle;
    # an engine gets the current published weights) and its work retried, at most this many times
    # per role over the run.
    max_actor_restarts: int = Field(default=3, ge=0)
    stop_after_step: int | None = Field(default=None, ge=1)  # fault injection: end the run after this step, as if killed


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
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    # A peft method trains adapters on the policy's frozen base; each step only the adapter travels
    # to the engines. The reference is the base (reference.checkpoint unset).
    peft: PeftConfig = Field(default_factory=PeftConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)  # train only some of the policy's blocks
    faults: FaultConfig = Field(default_factory=FaultConfig)

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
    def uses_lora(self) -> bool:
        return self.peft.method == "lora"

    @property
    def uses_adapter(self) -> bool:
        """Bottleneck adapters or a soft prompt: published in raylm's names (LoRA goes in PEFT's)."""
        return self.peft.method in ("bottleneck", "prompt_tuning")

    @property
    def soft_prompt_tokens(self) -> int:
        return self.peft.num_virtual_tokens if self.peft.method == "prompt_tuning" else 0

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
    if config.peft.method == "bottleneck" and config.rollout.backend == "vllm":
        raise ConfigError(f"{config_path}: rollout.backend: vLLM cannot serve bottleneck adapters (peft.method); "
                          "use backend torch or auto (raylm's own generator applies them)")
    if config.freeze.train_layers is not None:
        if config.peft.method != "none":
            raise ConfigError(f"{config_path}: freeze.train_layers and peft.method: {config.peft.method} both set; "
                              f"{config.peft.method} already freezes the whole base: choose one")
        if config.freeze.train_layers > policy.get("num_hidden_layers", 10**9):
            raise ConfigError(f"{config_path}: freeze.train_layers: {config.freeze.train_layers} exceeds the policy's "
                              f"{policy['num_hidden_layers']} layers")
    if config.peft.quantize != "none":
        raise ConfigError(f"{config_path}: peft.quantize: a quantized policy base would differ from the engines' "
                          "full-precision one, so their log-probs would not agree; use quantize: none")
    if config.uses_lora and config.rollout.backend == "torch":
        raise ConfigError(f"{config_path}: peft.method: lora needs rollout.backend vllm (raylm's own generator "
                          "does not apply adapters)")
    if not config.tokenizer_file.exists():
        raise ConfigError(f"{config_path}: data.tokenizer: {config.tokenizer_file} not found")
    if config.data.prompts is not None and not Path(config.data.prompts).is_file():
        raise ConfigError(f"{config_path}: data.prompts: {config.data.prompts} is not a file")
    if (config.data.max_prompt_tokens + config.soft_prompt_tokens + config.rollout.max_new_tokens
            > policy.get("max_position_embeddings", 10**9)):
        raise ConfigError(f"{config_path}: rollout.max_new_tokens: data.max_prompt_tokens + max_new_tokens "
                          f"(+ peft.num_virtual_tokens) exceeds the policy's max_position_embeddings "
                          f"({policy['max_position_embeddings']})")


# ---- the task: prompts, chat format, ground truth -----------------------------------------------

class Task:
    """Prompts in the chat format the policy was fine-tuned on, what the reward model reads, and the
    ground truth (word-overlap F1 with the reference answer, where the prompts carry one)."""

    def __init__(self, config: Config):
        from raylm.data.chat_template import ChatTemplate

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
            from raylm.data.stdlib_task import stdlib_prompts

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
        """The conversation as the reward model was trained on it, closed as the chat template closes
        an assistant message (raylm's: ... response <|end|> <|eos|>)."""
        return self.template.close(prompt_ids, response)

    def text(self, response: list[int]) -> str:
        return self.template.tokenizer.decode([t for t in response if t != self.template.end_id])

    def ground_truth(self, item: dict, response: list[int]) -> float | None:
        from raylm.data.stdlib_task import reference_score

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

    def state_dict(self) -> dict:
        return {"order": self.order.tolist(), "position": self.position, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) != len(self.items):
            raise ValueError(f"prompt sampler: the checkpoint shuffled {len(state['order'])} prompts, this run has "
                             f"{len(self.items)} (data: changed since the checkpoint was written)")
        self.order, self.position = np.array(state["order"]), int(state["position"])
        self.rng.bit_generator.state = state["rng"]


def rollout_seeds(seed: int, step: int, n: int) -> list[int]:
    """One sampling seed per rollout of a step: a resumed run samples what the uninterrupted one did."""
    return [(seed * 1_000_003 + step) * 100_003 + i for i in range(n)]


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
    """Every actor of the run, by role; methods fan work out over a pool and wait with a timeout.
    A rollout engine, reward scorer or reference actor that dies is replaced in its placement bundle
    and its share of the work retried (``replace``); the trainer groups are not (a run that loses a
    trainer rank resumes from its last checkpoint)."""

    config: Config
    policy: object  # TrainerGroup
    critic: object | None
    engines: list
    reward: list
    reference: list
    backend: str
    placement_groups: list = field(default_factory=list)
    strategies: dict = field(default_factory=dict)  # role -> scheduling strategy per actor index
    published: dict | None = None  # the last weights published to the engines: {"buckets", "version"}
    replacements: list = field(default_factory=list)  # (role, index) of every actor replaced

    @classmethod
    def start(cls, config: Config) -> "Pools":
        from raylm.actors.generation_engine import vllm_available
        from raylm.actors.policy_trainer import PolicyTrainer
        from raylm.actors.trainer_group import TrainerGroup
        from raylm.actors.value_trainer import ValueTrainer

        backend = config.rollout.backend
        if backend == "auto":
            backend = "vllm" if vllm_available() and config.peft.method != "bottleneck" else "torch"
            if backend == "torch":
                why = ("vLLM cannot serve bottleneck adapters" if config.peft.method == "bottleneck"
                       else "vLLM is not installed here")
                msg = f"{why}: the rollout pool uses raylm's own KV-cache generator"
                log.warning(msg)
                print(f"[rlhf] {msg}", flush=True)
        strategies, pgs = place_pools(config)
        pools = cls(config, None, None, [], [], [], backend, pgs, strategies)
        # Slow starts (vLLM engines) first, so that they overlap with the others.
        pools.engines = [pools.new_actor("rollout", i) for i in range(config.rollout.num_engines)]
        pools.reward = [pools.new_actor("reward", i) for i in range(config.reward.num_actors)]
        pools.reference = [pools.new_actor("reference", i) for i in range(config.reference.num_actors)]
        startup, p = config.timeouts.startup_s, config.policy
        pools.policy = TrainerGroup("policy", PolicyTrainer, p.num_workers, strategies["policy"], p.cpus_per_worker,
                                    p.gpus_per_worker, startup, seed=config.seed)
        if config.uses_critic:
            c = config.critic
            pools.critic = TrainerGroup("critic", ValueTrainer, c.num_workers, strategies["critic"], c.cpus_per_worker,
                                        c.gpus_per_worker, startup, seed=config.seed + 1)
        wait([a.ready.remote() for a in pools.engines + pools.reward + pools.reference], startup,
             "starting engines and models")
        return pools

    def new_actor(self, role: str, i: int):
        """Start actor ``i`` of a rollout, reward or reference pool in its placement bundle."""
        from raylm.actors.generation_engine import TorchEngine, VLLMEngine
        from raylm.actors.reference_model import ReferenceModel
        from raylm.actors.reward_scorer import RewardScorer

        config = self.config
        strategy = self.strategies[role][i]
        if role == "rollout":
            ro = config.rollout
            # One token of room beyond the longest rollout, so that prompt_logprobs can score whole rollouts.
            positions = json.loads((Path(config.policy.checkpoint) / "config.json").read_text())["max_position_embeddings"]
            longest = config.data.max_prompt_tokens + config.soft_prompt_tokens + ro.max_new_tokens + 1
            kwargs = dict(dtype="float32", max_model_len=min(positions, longest), seed=config.seed + i)
            if self.backend == "vllm":
                kwargs.update(gpu_memory_utilization=ro.gpu_memory_utilization)
                if config.uses_lora:
                    kwargs.update(max_lora_rank=config.peft.rank)
                kwargs.update(soft_prompt_tokens=config.soft_prompt_tokens)
            elif config.uses_lora:
                raise ConfigError("peft.method: lora needs the vLLM rollout backend, and vLLM is not installed here")
            elif config.uses_adapter:
                kwargs.update(peft=config.peft.model_dump())
            engine_cls = VLLMEngine if self.backend == "vllm" else TorchEngine
            return engine_cls.options(num_cpus=ro.cpus_per_engine, num_gpus=ro.gpus_per_engine,
                                      scheduling_strategy=strategy).remote(str(Path(config.policy.checkpoint).resolve()), **kwargs)
        if role == "reward":
            rw = config.reward
            return RewardScorer.options(num_cpus=rw.cpus_per_actor, num_gpus=rw.gpus_per_actor,
                                        scheduling_strategy=strategy).remote(
                str(Path(rw.checkpoint).resolve()), threads=max(1, int(rw.cpus_per_actor)), use_gpu=rw.gpus_per_actor > 0)
        if role == "reference":
            rf = config.reference
            return ReferenceModel.options(num_cpus=rf.cpus_per_actor, num_gpus=rf.gpus_per_actor,
                                          scheduling_strategy=strategy).remote(
                str(Path(config.reference_checkpoint).resolve()), threads=max(1, int(rf.cpus_per_actor)),
                use_gpu=rf.gpus_per_actor > 0)
        raise ValueError(f"new_actor: {role!r} is not a pool of single actors (rollout, reward, reference)")

    def actors_of(self, role: str) -> list:
        return {"rollout": self.engines, "reward": self.reward, "reference": self.reference}[role]

    def replace(self, role: str, i: int, error: Exception) -> None:
        """A fresh actor in the dead one's place (its bundle is free again); an engine then loads
        the weights last published, so it serves the current policy version."""
        import ray

        limit = self.config.faults.max_actor_restarts
        done = sum(1 for r, _ in self.replacements if r == role)
        if done >= limit:
            raise RuntimeError(f"{role} actor {i} died ({type(error).__name__}); {role} actors were already replaced "
                               f"{done} times (faults.max_actor_restarts: {limit})") from error
        msg = f"{role} actor {i} died ({type(error).__name__}): starting a replacement ({done + 1}/{limit})"
        log.warning(msg)
        print(f"[rlhf] {msg}", flush=True)
        actors = self.actors_of(role)
        ray.kill(actors[i])  # already dead, or unreachable: make sure it stays gone
        actors[i] = self.new_actor(role, i)
        wait(actors[i].ready.remote(), self.config.timeouts.startup_s, f"replacement {role} actor {i}")
        if role == "rollout" and self.published is not None:
            method, kwargs = self.engine_load(self.published["buckets"], self.published["version"])
            wait(getattr(actors[i], method).remote(**kwargs), self.config.timeouts.remote_s,
                 f"weight sync to the replacement engine {i}")
        self.replacements.append((role, i))

    def fan_out(self, role: str, method: str, shards: list[dict | None], what: str, **kwargs) -> list:
        """Actor i of ``role`` runs ``method(**shards[i], **kwargs)`` (a None shard: nothing to do); an
        actor that dies is replaced and its shard retried. -> the results, in shard order."""
        import ray

        actors = self.actors_of(role)
        results = [None] * len(shards)
        pending = {i: getattr(actors[i], method).remote(**shard, **kwargs) for i, shard in enumerate(shards)
                   if shard is not None}
        while pending:
            retry = []
            for i, ref in pending.items():
                try:
                    results[i] = wait(ref, self.config.timeouts.remote_s, f"{what} ({role} actor {i})")
                except ray.exceptions.RayActorError as error:
                    self.replace(role, i, error)
                    retry.append(i)
            pending = {i: getattr(actors[i], method).remote(**shards[i], **kwargs) for i in retry}
        return results

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

    def setup_trainers(self, config: Config) -> dict:
        """(Re)load the policy and the critic from their starting checkpoints. -> the policy's
        parameter counts (all, and those that train)."""
        p = config.policy
        from raylm.train.spec import Freeze

        peft = config.peft.model_copy() if config.peft.method != "none" else None
        freeze = (Freeze(config.freeze.train_layers, config.freeze.train_from)
                  if config.freeze.train_layers is not None else None)
        futures = [a.setup.remote(str(Path(p.checkpoint).resolve()), p.lr, p.weight_decay, grad_clip=p.grad_clip,
                                  peft=peft, freeze=freeze)
                   for a in self.policy.actors]
        if self.critic is not None:
            c = config.critic
            futures += [a.setup.remote(str(Path(config.critic_checkpoint).resolve()), c.lr, grad_clip=c.grad_clip)
                        for a in self.critic.actors]
        counts = wait(futures, config.timeouts.startup_s, "loading the policy and critic")[0]
        return {f"policy/{k}": v for k, v in counts.items()}

    def generate(self, prompts: list[list[int]], stop_ids: list[int], temperature: float,
                 seeds: list[int] | None = None, max_new_tokens: int | None = None) -> list[dict]:
        """``seeds``: one per prompt (None: each engine's own stream)."""
        ro = self.config.rollout
        n = len(self.engines)
        seed_chunks = split_evenly(seeds, n) if seeds is not None else [None] * n
        shards = [{"prompts": c, "seed": s} if c else None for c, s in zip(split_evenly(prompts, n), seed_chunks)]
        parts = self.fan_out("rollout", "generate", shards, "rollout",
                             max_new_tokens=max_new_tokens or ro.max_new_tokens, temperature=temperature,
                             top_p=ro.top_p, top_k=ro.top_k, logprobs=True, stop_token_ids=stop_ids)
        return [r for part in parts if part is not None for r in part]

    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        shards = [{"sequences": c} if c else None for c in split_evenly(sequences, len(self.reward))]
        parts = self.fan_out("reward", "score", shards, "reward")
        return torch.tensor([s for part in parts if part is not None for s in part])

    def reference_logprobs(self, batch: dict, temperature: float) -> torch.Tensor:
        shards = [{"batch": b} for b in shard_batch(batch, len(self.reference))]
        parts = self.fan_out("reference", "logprobs", shards, "reference", temperature=temperature)
        return cat_padded(parts)

    def engine_load(self, buckets: list, version: int) -> tuple[str, dict]:
        """The engine method (and its arguments) that loads published buckets: full weights, a LoRA
        policy's adapter, or another method's adapter weights."""
        if self.config.uses_adapter:
            return "load_adapter_buckets", {"bucket_refs": buckets, "version": version}
        if not self.config.uses_lora:
            return "load_weight_buckets", {"bucket_refs": buckets, "version": version}
        from raylm.peft.lora import adapter_config, settings_of

        peft = self.config.peft
        config = adapter_config(settings_of(peft), str(Path(self.config.policy.checkpoint).resolve()),
                                list(peft.target_modules))
        return "load_lora_buckets", {"bucket_refs": buckets, "adapter_config": config, "version": version}

    def publish(self, version: int) -> dict:
        """The policy's weights (a LoRA policy: its adapter), published once (bucketed) into the
        object store, loaded by every engine."""
        bucket_bytes = int(self.config.rollout.bucket_mb * 2**20)
        published = self.policy.run("publish_weights", bucket_bytes)[0]
        # Kept (and with it the buckets in the object store) until the next publication, for a replacement engine.
        self.published = {"buckets": published["buckets"], "version": version}
        method, kwargs = self.engine_load(published["buckets"], version)
        load_s = self.fan_out("rollout", method, [kwargs] * len(self.engines), "weight sync")
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

def evaluate(pools: Pools, task: Task, items: list[dict], samples: int, temperature: float, seed: int) -> dict:
    """Policy samples on fixed prompts (with fixed seeds, so before and after are paired): mean
    reward-model score, ground-truth score, KL to the reference (k1 summed over each response,
    from the engines' log-probs), response length."""
    if not items:
        return {}
    prompts = [item["ids"] for item in items for _ in range(samples)]
    owners = [item for item in items for _ in range(samples)]
    rollouts = pools.generate(prompts, task.stop_ids, temperature, seeds=rollout_seeds(seed, 0, len(prompts)))
    responses = [r["tokens"] for r in rollouts]
    scores = pools.score([task.reward_sequence(p, r) for p, r in zip(prompts, responses)])
    batch = make_batch(prompts, responses)
    ref = pools.reference_logprobs(batch, temperature)
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
    from raylm.rl.ppo import (
        gae,
        group_advantages,
        kl_estimate,
        kl_penalised_rewards,
        masked_mean,
        normalise_scores,
        whiten,
    )

    ppo, kl_cfg, timeout = config.ppo, config.kl, config.timeouts.remote_s
    temperature = config.rollout.temperature
    times, started = {}, time.perf_counter()

    # 1. sample prompts
    items = sampler.next(ppo.prompts_per_step)
    owners = [item for item in items for _ in range(ppo.samples_per_prompt)]  # a prompt's samples are consecutive
    prompts = [item["ids"] for item in owners]

    # 2. rollouts, each stamped with the policy version that produced it
    t = time.perf_counter()
    rollouts = pools.generate(prompts, task.stop_ids, temperature, seeds=rollout_seeds(config.seed, step, len(prompts)))
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
    # (log-probs of softmax(logits / temperature), the distribution the rollouts were sampled from)
    t = time.perf_counter()
    policy_futures = pools.policy.submit_sharded("logprobs", shard_batch(batch, pools.policy.world_size),
                                                 temperature=temperature)
    critic_futures = (pools.critic.submit_sharded("values", shard_batch(batch, pools.critic.world_size))
                      if pools.critic is not None else [])
    ref_logprobs = pools.reference_logprobs(batch, temperature)
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
        kl_estimator=kl_cfg.estimator, step=step, temperature=temperature)
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


# ---- checkpoints --------------------------------------------------------------------------------

DRIVER_STATE = "driver_state.json"  # written last: a checkpoint folder without it is incomplete


def checkpoint_root(config: Config) -> Path:
    return config.output_path / "checkpoints"


def latest_checkpoint(config: Config) -> Path | None:
    done = sorted(p for p in checkpoint_root(config).glob("step_*") if (p / DRIVER_STATE).exists())
    return done[-1] if done else None


def save_checkpoint(config: Config, pools: Pools, state: RunState, sampler: PromptSampler, step: int,
                    record: dict) -> Path:
    """Policy and critic (weights and optimizer shards, torch DCP, and each rank's RNG) and the
    driver's state (step, policy version, KL coefficient, reward moments, the prompt sampler's
    position and RNG, ``record``: the before-training evaluation and the step history)."""
    folder = checkpoint_root(config) / f"step_{step:06d}"
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete one from a run that died while writing it
    started = time.perf_counter()
    pools.policy.run("save_state", str((folder / "policy").resolve()))
    if pools.critic is not None:
        pools.critic.run("save_state", str((folder / "critic").resolve()))
    driver = {"step": step, "policy_version": state.version, "kl_coef": state.kl_ctl.value,
              "reward_moments": state.moments.state_dict() if state.moments is not None else None,
              "sampler": sampler.state_dict(), **record}
    (folder / (DRIVER_STATE + ".tmp")).write_text(json.dumps(driver))
    (folder / (DRIVER_STATE + ".tmp")).rename(folder / DRIVER_STATE)
    complete = sorted(p for p in checkpoint_root(config).glob("step_*") if (p / DRIVER_STATE).exists())
    for old in complete[:-config.checkpoint.keep]:
        shutil.rmtree(old)
    log.info("checkpoint %s written in %.1f s", folder, time.perf_counter() - started)
    return folder


def load_checkpoint(folder: Path, pools: Pools, state: RunState, sampler: PromptSampler) -> dict:
    """Restore what ``save_checkpoint`` wrote into trainers already set up; -> the driver's state."""
    driver = json.loads((folder / DRIVER_STATE).read_text())
    if (pools.critic is not None) != (folder / "critic").exists():
        raise ConfigError(f"{folder}: written by a run {'without' if pools.critic is not None else 'with'} a critic "
                          "(ppo.advantage changed since); use another output_dir or checkpoint.resume: false")
    pools.policy.run("load_state", str((folder / "policy").resolve()))
    if pools.critic is not None:
        pools.critic.run("load_state", str((folder / "critic").resolve()))
    state.version = driver["policy_version"]
    state.kl_ctl.value = driver["kl_coef"]
    if state.moments is not None and driver["reward_moments"] is not None:
        state.moments.load_state_dict(driver["reward_moments"])
    sampler.load_state_dict(driver["sampler"])
    return driver


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
    """The whole run on pools that are already up (tests start the pools once and train twice).
    Continues from the newest complete checkpoint under ``output_dir`` when there is one."""
    from raylm.rl.ppo import AdaptiveKLController, FixedKLController, RunningMoments

    started = time.perf_counter()
    stage_run.set_tags({"raylm.rollout_backend": pools.backend})
    print(f"[rlhf] rollout backend: {pools.backend}; {len(task.train)} training prompts, "
          f"{len(task.held_out)} held out", flush=True)
    counts = pools.setup_trainers(config)
    stage_run.log_metrics(counts)
    print(f"[rlhf] policy: {counts['policy/trainable_params']:,} of {counts['policy/params']:,} parameters train",
          flush=True)
    state = RunState()
    state.kl_ctl = (AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon) if config.kl.adaptive
                    else FixedKLController(config.kl.coef))
    state.moments = RunningMoments() if config.reward.normalize else None
    sampler = PromptSampler(task.train, config.seed)
    resume_from = latest_checkpoint(config) if config.checkpoint.resume else None
    record = {}
    if resume_from is not None:
        record = load_checkpoint(resume_from, pools, state, sampler)
        msg = (f"resuming from {resume_from} (step {record['step']}, policy version {state.version}, "
               f"KL coef {state.kl_ctl.value:.4g}, prompt {sampler.position} of the epoch)")
        log.info(msg)
        print(f"[rlhf] {msg}", flush=True)
        stage_run.set_tags({"raylm.resumed_from": str(resume_from)})
    # The engines serve the trainer's own copy of the weights (the starting ones, or the checkpoint's).
    initial_sync = pools.publish(state.version)
    stage_run.log_metrics({f"initial_{k}": v for k, v in initial_sync.items()}, step=record.get("step", 0))

    eval_items = task.train[:config.eval.prompts]
    held_out = task.held_out[:config.eval.prompts]
    samples, temperature = config.eval.samples_per_prompt, config.rollout.temperature
    if resume_from is None:
        record = {"step": 0, "before": evaluate(pools, task, eval_items, samples, temperature, config.seed),
                  "before_held_out": evaluate(pools, task, held_out, samples, temperature, config.seed), "history": []}
        log_eval(stage_run, "before", record["before"], record["before_held_out"], step=0)
    before, before_held_out, history = record["before"], record["before_held_out"], record["history"]

    progress = Progress(config.ppo.steps, "rlhf")
    for step in range(record["step"] + 1, config.ppo.steps + 1):
        metrics = ppo_step(config, pools, task, sampler, state, step)
        metrics["faults/actors_replaced"] = len(pools.replacements)
        history.append({k: metrics[k] for k in HISTORY_KEYS})
        stage_run.log_metrics(metrics, step=step)
        progress.update(step, reward=metrics["reward/mean"], truth=metrics["ground_truth/mean"] or 0.0,
                        kl=metrics["kl/mean"], pg=metrics["policy/loss"], clip=metrics["policy/clip_fraction"],
                        sync_s=metrics["time/weight_sync_s"])
        if config.checkpoint.every and (step % config.checkpoint.every == 0 or step == config.ppo.steps):
            save_checkpoint(config, pools, state, sampler, step,
                            {"before": before, "before_held_out": before_held_out, "history": history})
        if step == config.faults.stop_after_step:
            print(f"[rlhf] faults.stop_after_step: stopping after step {step}", flush=True)
            return {"stopped_after_step": step, "policy_version": state.version, "steps": config.ppo.steps}

    after = evaluate(pools, task, eval_items, samples, temperature, config.seed)
    after_held_out = evaluate(pools, task, held_out, samples, temperature, config.seed)
    log_eval(stage_run, "after", after, after_held_out, step=config.ppo.steps)

    export_dir = (config.output_path / "hf").resolve()
    pools.policy.run("save", str(export_dir), str(config.tokenizer_file.resolve()))
    stage_run.log_artifact(export_dir, "model")
    wall = time.perf_counter() - started
    summary = {
        "checkpoint": str(export_dir), "steps": config.ppo.steps, "rollout_backend": pools.backend,
        "policy_version": state.version, "wall_s": wall,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "actors_replaced": [f"{role} {i}" for role, i in pools.replacements],
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


# What the summary keeps of each step (and a checkpoint, for a resumed run's summary).
HISTORY_KEYS = ("reward/mean", "ground_truth/mean", "kl/mean", "policy/loss", "policy/clip_fraction",
                "rollout/logprob_diff_vs_trainer", "time/weight_sync_s")


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
