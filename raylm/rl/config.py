"""`raylm rlhf`'s configuration: one section per role (policy, critic, rollout, reward, reference)
and per part of the algorithm (kl, ppo, data, eval), placement, checkpoints, faults and timeouts;
``check`` validates what needs more than one section (checkpoints exist, share a vocabulary) before
any Ray work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylm.config import ConfigError, InputPath, OutputDir, Section, StageConfig
from raylm.peft.config import PeftConfig
from raylm.tasks.reward_functions import RewardSpec
from raylm.train.config import FreezeConfig

PER_ITEM = "per_item"  # reward.rule: each prompt record's own "reward" spec
ROLES = ("policy", "critic", "rollout", "reward", "reference")
Role = Literal["policy", "critic", "rollout", "reward", "reference"]

class PolicyConfig(Section):
    checkpoint: InputPath = "out/sft/hf"  # a causal-LM Hugging Face folder with its tokenizer.json (raylm sft output)
    num_workers: int = Field(default=2, ge=1)  # ranks of the FSDP2 policy group
    # CPUs each policy rank holds (their integer part, at least 1: its torch threads)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)  # GPUs each policy rank holds (0: CPU)
    lr: float = Field(default=1e-5, gt=0)  # the policy's learning rate (AdamW, constant)
    weight_decay: float = Field(default=0.0, ge=0)  # the policy's AdamW decoupled weight decay
    grad_clip: float = Field(default=1.0, ge=0)  # max global grad norm of the policy; 0: no clipping


class CriticConfig(Section):
    checkpoint: InputPath | None = None  # None: start from the reward model (its head included)
    num_workers: int = Field(default=1, ge=1)  # ranks of the FSDP2 critic group
    # CPUs each critic rank holds (their integer part, at least 1: its torch threads)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)  # GPUs each critic rank holds (0: CPU)
    lr: float = Field(default=5e-5, gt=0)  # the critic's learning rate (AdamW, constant)
    grad_clip: float = Field(default=1.0, ge=0)  # max global grad norm of the critic; 0: no clipping


class RolloutConfig(Section):
    backend: Literal["auto", "vllm", "torch"] = "auto"  # auto: vLLM where it imports
    num_engines: int = Field(default=1, ge=1)  # generation engine actors
    cpus_per_engine: float = Field(default=0.5, gt=0)  # CPUs each engine actor holds
    gpus_per_engine: float = Field(default=0, ge=0)  # GPUs each engine actor holds (0: CPU)
    max_new_tokens: int = Field(default=32, ge=1)  # longest response, in tokens
    # sampling temperature; log-probs are those of softmax(logits / temperature)
    temperature: float = Field(default=1.0, gt=0)
    # nucleus sampling: the smallest set of tokens with this probability
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # sample from the k likeliest tokens; 0: off
    gpu_memory_utilization: float = Field(default=0.1, gt=0, lt=1)  # vLLM on CPU: the share of host RAM for its KV cache
    bucket_mb: float = Field(default=64, gt=0)  # weight publication: tensors packed into buckets of this size
    # Asynchronous rollouts: the engines generate up to this many steps ahead while the trainer trains, so a
    # step's rollouts may come from up to this many policy versions back (0: synchronous, every rollout from the
    # current policy). Pair with ppo.tis_cap.
    max_staleness: int = Field(default=0, ge=0)
    # Multi-turn tool rollouts: tool_use: each rollout is an episode with raylm.tasks.tool_use's tools (a tool call
    # is run and its result appended as the chat template's tokens; only model tokens carry loss); null: one turn
    tools: Literal["tool_use"] | None = None
    max_turns: int = Field(default=4, ge=1)  # with rollout.tools: assistant turns per episode at most


class RewardConfig(Section):
    # a *ForSequenceClassification folder (raylm reward output); None: no reward model (reward.rule only)
    checkpoint: InputPath | None = "out/reward/hf"
    # A verifiable reward (raylm.tasks.rewards), beside or instead of the reward model: a rule name (exact_match,
    # regex, numeric, tool_use, string_transform), a mapping {rule: ..., options} or {function: "file.py:fn",
    # timeout_s}, or per_item: each prompt record's own "reward" field (raylm.tasks.files' RL prompt sets).
    # A function's file is relative to the config file's folder (a --set value: to the current directory).
    rule: RewardSpec = None
    model_weight: float = Field(default=1.0, ge=0)  # with both: score = model_weight * model + rule_weight * rule
    rule_weight: float = Field(default=1.0, ge=0)  # with both: the rule's weight in the score (see model_weight)
    rule_timeout_s: float = Field(default=5.0, gt=0)  # per item: a user function that hangs longer scores a failure
    rule_actors: int = Field(default=1, ge=1)  # rule-reward actors (each scores a share of a batch)
    num_actors: int = Field(default=1, ge=1)  # reward-model scorer actors
    # CPUs each reward-model actor holds (their integer part, at least 1: its torch threads)
    cpus_per_actor: float = Field(default=0.25, gt=0)
    gpus_per_actor: float = Field(default=0, ge=0)  # GPUs each reward-model actor holds (0: CPU)
    normalize: bool = True  # (score - running mean) / running std
    clip: float | None = Field(default=5.0, gt=0)  # then clip to +-clip; None: no clipping


class ReferenceConfig(Section):
    checkpoint: InputPath | None = None  # None: the policy's starting checkpoint
    num_actors: int = Field(default=1, ge=1)  # reference-model actors (they compute the reference log-probs)
    # CPUs each reference actor holds (their integer part, at least 1: its torch threads)
    cpus_per_actor: float = Field(default=0.25, gt=0)
    gpus_per_actor: float = Field(default=0, ge=0)  # GPUs each reference actor holds (0: CPU)


class KLConfig(Section):
    # per-token KL estimator: k1 = log p - log q, k2 = (log p - log q)^2 / 2, k3 (never negative)
    estimator: Literal["k1", "k2", "k3"] = "k1"
    mode: Literal["reward", "loss"] = "reward"  # a per-token reward penalty, or a term of the policy loss
    coef: float = Field(default=0.05, ge=0)  # the KL coefficient (the adaptive controller's starting value)
    adaptive: bool = False  # Ziegler et al.'s controller: move coef so the KL tracks target
    target: float = Field(default=1.0, gt=0)  # nats per response (summed over its tokens)
    # adaptive controller: coef *= 1 + clip(KL / target - 1, +-0.2) * rollouts / horizon
    horizon: float = Field(default=10000, gt=0)


class PPOConfig(Section):
    steps: int = Field(default=20, ge=1)  # PPO steps (rollout, score, update) in the run
    prompts_per_step: int = Field(default=16, ge=1)  # prompts sampled per step (each samples_per_prompt times)
    samples_per_prompt: int = Field(default=1, ge=1)  # >= 2 for group baselines
    advantage: Literal["gae", "grpo", "rloo"] = "gae"  # grpo / rloo: critic-free group baselines
    epochs: int = Field(default=2, ge=1)  # passes over each step's rollouts
    minibatches: int = Field(default=2, ge=1)  # optimizer steps per epoch
    clip_eps: float = Field(default=0.2, gt=0)  # the policy ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_low: float | None = Field(default=None, gt=0, lt=1)  # None: clip_eps
    clip_high: float | None = Field(default=None, gt=0)  # None: clip_eps; larger (DAPO: 0.28) lets unlikely tokens rise
    # token_mean: every real token of a minibatch weighs the same (DAPO); sequence_mean: each response's
    # token mean, then the mean over responses (the GRPO paper)
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    # Group baselines: drop the prompts whose samples all score the same (zero advantage, no signal) and
    # sample more prompts to refill, up to max_sampling_rounds rounds; then any shortfall is filled with
    # dropped groups (which carry no policy gradient)
    dynamic_sampling: bool = False
    # dynamic_sampling: at most this many rounds of sampling per step
    max_sampling_rounds: int = Field(default=3, ge=1)
    overlong_filter: bool = False  # responses cut by rollout.max_new_tokens (no stop token) carry no policy loss
    # Truncated importance sampling: each token's loss weighted by min(exp(trainer - engine log-prob), tis_cap),
    # correcting the engines' numerics and, with rollout.max_staleness, their older weights; None: off
    tis_cap: float | None = Field(default=None, gt=0)
    value_clip_eps: float | None = Field(default=0.2, gt=0)  # None: unclipped value loss
    gamma: float = Field(default=1.0, ge=0, le=1)  # GAE discount per token
    lam: float = Field(default=0.95, ge=0, le=1)  # GAE lambda: bias (0) vs variance (1) of the advantages
    whiten_advantages: bool = True  # normalise advantages to zero mean, unit variance over the step's tokens
    entropy_coef: float = Field(default=0.0, ge=0)  # weight of the entropy bonus in the policy loss; 0: none

    @model_validator(mode="after")
    def _groups(self):
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: {self.advantage} compares samples of one prompt: needs >= 2")
        if self.dynamic_sampling and self.advantage == "gae":
            raise ValueError("dynamic_sampling: drops groups of samples of one prompt: needs advantage grpo or rloo")
        return self

    @property
    def clip_range(self) -> tuple[float, float]:
        """(clip_low, clip_high), each defaulting to clip_eps."""
        return (self.clip_low or self.clip_eps, self.clip_high or self.clip_eps)


class DataConfig(Section):
    builtin: Literal["stdlib"] | None = "stdlib"  # "What does `f(sig)` do?" -> f's docstring line (raylm.data.preferences)
    prompts: InputPath | None = None  # or a JSONL file of {"prompt": str, "reference": str (optional), "reward": spec (optional)}
    held_out: InputPath | None = None  # with prompts: a JSONL file of held-out prompts of the same form, evaluated before and after
    limit: int | None = Field(default=None, ge=2)  # functions of the built-in task (evenly spread), None: all
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # the built-in task's held-out split
    max_prompt_tokens: int = Field(default=96, ge=4)  # longer prompts are left out
    tokenizer: InputPath | None = None  # default: the policy checkpoint's tokenizer.json


class EvalConfig(Section):
    prompts: int = Field(default=32, ge=0)  # fixed prompts sampled before and after training (0: skip)
    # responses sampled per evaluation prompt (at rollout.temperature, fixed seeds)
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
    # A policy or critic group that loses a rank is replaced whole (same bundles, a new rendezvous) and the
    # run goes on from its newest checkpoint, at most this many times per group over the run.
    max_trainer_restarts: int = Field(default=3, ge=0)
    stop_after_step: int | None = Field(default=None, ge=1)  # fault injection: end the run after this step, as if killed
    kill_trainer_at_step: int | None = Field(default=None, ge=1)  # fault injection: a policy rank's process exits at this step (once)
    kill_trainer_rank: int = Field(default=0, ge=0)  # fault injection: the policy rank kill_trainer_at_step ends


class TimeoutConfig(Section):
    remote_s: float = Field(default=600, gt=0)  # any single remote call (a rollout batch, an update)
    startup_s: float = Field(default=900, gt=0)  # actors and engines starting, placement groups


class Config(StageConfig):
    output_dir: OutputDir = "out/rlhf"
    # the policy: an FSDP2 trainer group, its starting checkpoint and optimizer
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    # the value model (used with ppo.advantage gae only)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    # the generation engines that sample the responses
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    # what scores a response: a reward model, a verifiable rule, or both
    reward: RewardConfig = Field(default_factory=RewardConfig)
    # the frozen reference model the KL is measured against
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    # the KL between policy and reference: estimator, coefficient, controller
    kl: KLConfig = Field(default_factory=KLConfig)
    # the PPO step: rollouts per step, advantages, clipping, epochs
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    data: DataConfig = Field(default_factory=DataConfig)  # the prompts: the built-in task or a JSONL file
    eval: EvalConfig = Field(default_factory=EvalConfig)  # the before/after evaluation on fixed prompts
    # which roles share placement-group bundles
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)  # timeouts of remote calls and start-up
    # checkpoints of the run (policy, critic, optimizers) and resuming
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    # A peft method trains adapters on the policy's frozen base; each step only the adapter travels
    # to the engines. The reference is the base (reference.checkpoint unset).
    peft: PeftConfig = Field(default_factory=PeftConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)  # train only some of the policy's blocks
    faults: FaultConfig = Field(default_factory=FaultConfig)  # actor replacement and fault injection

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
        if self.faults.kill_trainer_rank >= self.policy.num_workers:
            raise ValueError(f"faults.kill_trainer_rank: {self.faults.kill_trainer_rank} is not a policy rank "
                             f"(policy.num_workers: {self.policy.num_workers})")
        if self.data.builtin is None and self.data.prompts is None:
            raise ValueError("data: give prompts (a JSONL file) or builtin: stdlib")
        if self.reward.checkpoint is None and self.reward.rule is None:
            raise ValueError("reward: give a reward model (checkpoint), a rule, or both")
        if self.reward.rule == PER_ITEM and self.data.prompts is None:
            raise ValueError("reward.rule: per_item reads each record's 'reward' field of data.prompts (none given)")
        if self.rollout.tools is not None and self.uses_critic:
            raise ValueError("rollout.tools: GAE (ppo.advantage: gae) over responses with tool tokens is not supported; "
                             "use a group advantage (grpo, rloo)")
        if self.rollout.tools is not None and self.reward.rule is None:
            raise ValueError("rollout.tools: the reward is the episode's transcript score: set reward.rule (tool_use, "
                             "or per_item)")
        if self.data.held_out is not None and self.data.prompts is None:
            raise ValueError("data.held_out: goes with data.prompts (the built-in task has its own held-out split)")
        return self

    @property
    def rule_spec(self) -> str | dict | None:
        """The spec the rule-reward actors get: None reads each prompt record's own ``reward``."""
        return None if self.reward.rule == PER_ITEM else self.reward.rule

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
        """The critic starts from the reward model (its head included), else from the policy (a fresh zero head)."""
        return self.critic.checkpoint or self.reward.checkpoint or self.policy.checkpoint

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
    if any(a.endswith("ForSequenceClassification") for a in policy.get("architectures", [])):
        raise ConfigError(f"{config_path}: policy.checkpoint: {config.policy.checkpoint} is a scalar-head model, "
                          "not a causal LM")
    reference = _hf_config(config.reference_checkpoint, "reference.checkpoint", config_path)
    keys = [("reference.checkpoint", reference)]
    if config.reward.checkpoint is not None:
        reward = _hf_config(config.reward.checkpoint, "reward.checkpoint", config_path)
        if not any(a.endswith("ForSequenceClassification") for a in reward.get("architectures", [])):
            raise ConfigError(f"{config_path}: reward.checkpoint: {config.reward.checkpoint} is not a reward model "
                              "(no *ForSequenceClassification architecture; `raylm reward` writes one)")
        keys.append(("reward.checkpoint", reward))
    if config.rule_spec is not None:
        from raylm.tasks.rewards import RuleReward, parse_spec

        parsed = parse_spec(config.rule_spec, f"{config_path}: reward.rule")  # a bad spec: named now
        if "rule" in parsed:
            RuleReward(parsed, f"{config_path}: reward.rule")
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
    for key in ("prompts", "held_out"):
        path = getattr(config.data, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{config_path}: data.{key}: {path} is not a file")
    if (config.data.max_prompt_tokens + config.soft_prompt_tokens + config.rollout.max_new_tokens
            > policy.get("max_position_embeddings", 10**9)):
        raise ConfigError(f"{config_path}: rollout.max_new_tokens: data.max_prompt_tokens + max_new_tokens "
                          f"(+ peft.num_virtual_tokens) exceeds the policy's max_position_embeddings "
                          f"({policy['max_position_embeddings']})")
