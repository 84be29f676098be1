"""The PPO policy: one rank of the policy trainer group (see ``actors/trainer_group.py``).

Every rank holds an FSDP2 shard of the policy and receives its own equal share of each step's
rollouts as a dict of tensors: ``tokens`` [b, T] (prompt then response, right-padded),
``prompt_lens`` [b], ``response_mask`` [b, R], and for the update ``old_logprobs``, ``advantages``
(and ``ref_logprobs`` when the KL is a loss), all [b, R].

``publish_weights`` gathers the full weights once, converts them to Hugging Face names, packs
them into a few buckets and puts each into the object store once; every rollout engine then
loads the same buckets (``actors/generation_engine.py``). With a ``peft:`` section the base is
frozen and only the adapter trains, and only the adapter is gathered and published: LoRA's A and
B matrices in PEFT's names (the engines apply them as a vLLM LoRA adapter on their base), a soft
prompt or bottleneck adapters in raylm's names. With a ``freeze:`` section (train only some
blocks) the full weights are published as without one.
"""

from __future__ import annotations

import time

import ray
import torch

from raylm.actors.generation_engine import pack_weight_buckets
from raylm.actors.trainer_group import ShardedTrainer, TrainerGroup, mean_dicts
from raylm.rl.batching import cat_padded
from raylm.rl.ppo import response_index, response_logits_and_logprobs
from raylm.rl.remote import Pending
from raylm.train.engine import memory_gb
from raylm.train.losses import ppo_policy_loss


@ray.remote
class PolicyTrainer(ShardedTrainer):
    """The policy: the causal LM (with ``peft``, adapters on its frozen base; with ``freeze``, only
    some blocks train), built, sharded, stepped and exported by the engine."""

    role = "policy"

    def forward(self, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self.device)
        index = response_index(batch["prompt_lens"].to(self.device), batch["response_mask"].shape[1], tokens.shape[1])
        return response_logits_and_logprobs(self.model(tokens), tokens, index, temperature)

    @torch.no_grad()
    def logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """[b, R] log-probabilities of the response tokens under the current policy sampled at
        ``temperature`` (0 on padding)."""
        self.model.eval()
        _, logprobs = self.forward(batch, temperature)
        self.model.train()
        return (logprobs * batch["response_mask"].to(logprobs.device)).cpu()

    def update(self, batch: dict, epochs: int, minibatches: int, clip_eps: float, entropy_coef: float = 0.0,
               kl_loss_coef: float = 0.0, kl_estimator: str = "k3", step: int = 0, temperature: float = 1.0,
               clip_high: float | None = None, aggregation: str = "token_mean") -> dict:
        """``epochs`` passes over this rank's rollouts in ``minibatches`` optimizer steps each: PPO's
        clipped surrogate (ratio clipped to [1 - clip_eps, 1 + clip_high]), minus the entropy bonus,
        plus the KL to the reference when it is a loss. Log-probabilities and entropy are those of
        softmax(logits / temperature), the distribution the rollouts were sampled from.
        The batch may carry ``loss_mask`` (the tokens that carry loss; default ``response_mask``)
        and ``is_weights`` (per-token truncated importance weights).
        Each rank's loss is aggregated over its own minibatch; FSDP2 averages the gradients."""
        def loss(mb: dict) -> tuple[torch.Tensor, dict]:
            logits, logprobs = self.forward(mb, temperature)
            weights = mb["is_weights"].to(self.device) if "is_weights" in mb else None
            return ppo_policy_loss(
                logits, logprobs, mb["old_logprobs"].to(self.device), mb["advantages"].to(self.device),
                mb.get("loss_mask", mb["response_mask"]).to(self.device), clip_eps, entropy_coef,
                mb["ref_logprobs"].to(self.device) if kl_loss_coef > 0 else None, kl_loss_coef, kl_estimator,
                clip_high, aggregation, weights)

        metrics = self.ppo_epochs(batch, epochs, minibatches, step, loss)
        metrics["policy/memory_gb"] = memory_gb(self.device)  # this rank's peak
        metrics["policy/optimizer_state_mb"] = self.engine.optimizer_state_mb()  # this rank's shard
        return metrics

    def publish_weights(self, bucket_bytes: int) -> dict | None:
        """Collective: gather the full weights (a ``peft`` policy: its adapter only); rank 0 packs
        them into buckets and puts each into the object store once. -> on rank 0 ``{"buckets":
        [ObjectRef, ...], "seconds", "bytes"}``."""
        from raylm.models.hf_checkpoint import to_hf_state_dict

        start = time.perf_counter()
        if self.peft is not None:
            from raylm.peft.lora import adapter_tensors

            state = self.engine.trained_state_dict()
            if self.rank != 0:
                return None
            # LoRA: PEFT's names, as vLLM reads an adapter; a soft prompt or bottleneck adapters: raylm's
            hf_state = adapter_tensors(state) if self.peft.method == "lora" else state
        else:
            state = self.full_state_dict()
            if self.rank != 0:
                return None
            hf_state = to_hf_state_dict(self.config, state)
        buckets = pack_weight_buckets(hf_state, bucket_bytes)
        refs = [ray.put(bucket) for bucket in buckets]
        return {"buckets": refs, "seconds": time.perf_counter() - start,
                "bytes": sum(b["data"].nbytes for b in buckets)}


class PolicyGroup(TrainerGroup):
    """The driver's handle on the policy's ranks."""

    def __init__(self, world_size: int, strategies: list, num_cpus: float, num_gpus: float, startup_s: float,
                 remote_s: float, seed: int = 0):
        super().__init__("policy", PolicyTrainer, world_size, strategies, num_cpus, num_gpus, startup_s, remote_s, seed)

    def logprobs(self, batch: dict, temperature: float) -> Pending[torch.Tensor]:
        """-> [B, R] log-probabilities of the batch's response tokens (see ``PolicyTrainer.logprobs``)."""
        return self.sharded(lambda a, shard: a.logprobs.remote(shard, temperature=temperature), batch, "logprobs",
                            combine=cat_padded)

    def update(self, batch: dict, epochs: int, minibatches: int, clip_eps: float, entropy_coef: float,
               kl_loss_coef: float, kl_estimator: str, step: int, temperature: float, clip_high: float | None = None,
               aggregation: str = "token_mean") -> Pending[dict]:
        """PPO epochs over the batch, each rank on its rows; -> the ranks' mean metrics."""
        return self.sharded(lambda a, shard: a.update.remote(
            shard, epochs=epochs, minibatches=minibatches, clip_eps=clip_eps, entropy_coef=entropy_coef,
            kl_loss_coef=kl_loss_coef, kl_estimator=kl_estimator, step=step, temperature=temperature,
            clip_high=clip_high, aggregation=aggregation), batch, "update", combine=mean_dicts)

    def publish_weights(self, bucket_bytes: int) -> dict:
        """-> rank 0's publication: ``{"buckets": [ObjectRef, ...], "seconds", "bytes"}``."""
        return self.each(lambda a: a.publish_weights.remote(bucket_bytes), "publish_weights").result()[0]
