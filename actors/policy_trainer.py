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
from collections import defaultdict

import ray
import torch

from raylm.actors.generation_engine import pack_weight_buckets
from raylm.actors.trainer_group import ShardedTrainer
from raylm.ppo import (
    clipped_policy_loss,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    response_index,
    response_logits_and_logprobs,
)


def minibatch_rows(n: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation of ``n`` rows cut into ``minibatches`` equal parts (every rank the same count)."""
    order = torch.randperm(n, generator=generator)
    per = n // minibatches
    return [order[i * per:(i + 1) * per] for i in range(minibatches)]


def trim(batch: dict, rows: torch.Tensor) -> dict:
    """The rows of a batch, cut to the longest real sequence and response among them."""
    out = {k: v[rows] for k, v in batch.items()}
    width = int(out["response_mask"].sum(-1).max().clamp(min=1))
    seq_len = int((out["prompt_lens"] + out["response_mask"].sum(-1)).max())
    for key, value in out.items():
        if key == "tokens":
            out[key] = value[:, :max(seq_len, 2)]
        elif value.ndim == 2:
            out[key] = value[:, :width]
    return out


@ray.remote
class PolicyTrainer(ShardedTrainer):
    def build_model(self, checkpoint: str):
        from raylm.models.hf_checkpoint import load_checkpoint

        self.base_checkpoint = checkpoint
        model = load_checkpoint(checkpoint, scalar_head=False)
        self.config = model.config
        if self.freeze is not None:
            from raylm.actors.train_worker import freeze_by_depth

            freeze_by_depth(model, self.freeze["train_layers"], self.freeze["train_from"])
        if self.peft is not None:
            from raylm.lora import apply_peft
            from raylm.peft_config import PeftConfig

            apply_peft(model, PeftConfig(**self.peft), seed=self.seed)  # every rank: the same initial A
        return model

    def plain_model(self):
        from raylm.models.transformer import Transformer

        return Transformer(self.config)

    def forward(self, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self.device)
        index = response_index(batch["prompt_lens"].to(self.device), batch["response_mask"].shape[1], tokens.shape[1])
        return response_logits_and_logprobs(self.model(tokens), tokens, index, temperature)

    def save(self, folder: str, tokenizer_file: str | None = None) -> str | None:
        """Collective: a Hugging Face checkpoint of the current policy from rank 0; a LoRA policy's
        adapter goes to ``<folder>/adapter`` (PEFT's format) and the merged model to ``folder``;
        bottleneck adapters and a soft prompt, which do not merge, to ``<folder>/adapter`` only."""
        if self.peft is None:
            return super().save(folder, tokenizer_file)
        from raylm.lora import export_peft
        from raylm.models.hf_checkpoint import save_checkpoint
        from raylm.peft_config import PeftConfig

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        merged = export_peft(state, self.config, PeftConfig(**self.peft), f"{folder}/adapter", base=self.base_checkpoint)
        if merged is None:
            return f"{folder}/adapter"
        plain = self.plain_model()
        plain.load_state_dict(merged, strict=not self.config.tie_embeddings)
        return str(save_checkpoint(plain, folder, tokenizer_file=tokenizer_file))

    @torch.no_grad()
    def logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """[b, R] log-probabilities of the response tokens under the current policy sampled at
        ``temperature`` (0 on padding)."""
        self.model.eval()
        _, logprobs = self.forward(batch, temperature)
        self.model.train()
        return (logprobs * batch["response_mask"].to(logprobs.device)).cpu()

    def update(self, batch: dict, epochs: int, minibatches: int, clip_eps: float, entropy_coef: float = 0.0,
               kl_loss_coef: float = 0.0, kl_estimator: str = "k3", step: int = 0, temperature: float = 1.0) -> dict:
        """``epochs`` passes over this rank's rollouts in ``minibatches`` optimizer steps each: PPO's
        clipped surrogate, minus the entropy bonus, plus the KL to the reference when it is a loss.
        Log-probabilities and entropy are those of softmax(logits / temperature), the distribution
        the rollouts were sampled from.
        Each rank's loss is the token mean of its own minibatch; FSDP2 averages the gradients."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + step)
        stats = defaultdict(list)
        start = time.perf_counter()
        for _ in range(epochs):
            for rows in minibatch_rows(len(batch["tokens"]), minibatches, generator):
                mb = trim(batch, rows)
                mask = mb["response_mask"].to(self.device)
                logits, logprobs = self.forward(mb, temperature)
                out = clipped_policy_loss(logprobs, mb["old_logprobs"].to(self.device), mb["advantages"].to(self.device),
                                          mask, clip_eps)
                loss = out.loss
                with torch.set_grad_enabled(entropy_coef > 0):
                    entropy = masked_mean(entropy_from_logits(logits), mask)
                if entropy_coef > 0:
                    loss = loss - entropy_coef * entropy
                if kl_loss_coef > 0:
                    kl = masked_mean(kl_estimate(logprobs, mb["ref_logprobs"].to(self.device), kl_estimator), mask)
                    loss = loss + kl_loss_coef * kl
                    stats["policy/kl_loss"].append(kl.item())
                loss.backward()
                stats["policy/grad_norm"].append(self.optimizer_step())
                stats["policy/loss"].append(out.loss.item())
                stats["policy/clip_fraction"].append(float(out.clip_fraction))
                stats["policy/approx_kl"].append(float(out.approx_kl))
                stats["policy/entropy"].append(entropy.item())
        from raylm.actors.train_worker import memory_gb, optimizer_state_bytes

        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics["time/policy_update_s"] = time.perf_counter() - start
        metrics["policy/memory_gb"] = memory_gb(self.device)  # this rank's peak
        metrics["policy/optimizer_state_mb"] = optimizer_state_bytes(self.optimizer) / 2**20  # this rank's shard
        return metrics

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded parameters that train (a LoRA policy: only the adapters), raylm
        names, on every rank; the frozen base is not gathered."""
        from raylm.distributed.parallelize import clean_state_dict_key

        out = {}
        for name, param in self.model.named_parameters():  # the same order on every rank
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                out[clean_state_dict_key(name)] = full.detach().cpu()
        return out

    def publish_weights(self, bucket_bytes: int) -> dict | None:
        """Collective: gather the full weights (a ``peft`` policy: its adapter only); rank 0 packs
        them into buckets and puts each into the object store once. -> on rank 0 ``{"buckets":
        [ObjectRef, ...], "seconds", "bytes"}``."""
        from raylm.models.hf_checkpoint import to_hf_state_dict

        start = time.perf_counter()
        if self.peft is not None:
            from raylm.lora import adapter_tensors

            state = self.trained_state_dict()
            if self.rank != 0:
                return None
            # LoRA: PEFT's names, as vLLM reads an adapter; a soft prompt or bottleneck adapters: raylm's
            hf_state = adapter_tensors(state) if self.peft["method"] == "lora" else state
        else:
            state = self.full_state_dict()
            if self.rank != 0:
                return None
            hf_state = to_hf_state_dict(self.config, state)
        buckets = pack_weight_buckets(hf_state, bucket_bytes)
        refs = [ray.put(bucket) for bucket in buckets]
        return {"buckets": refs, "seconds": time.perf_counter() - start,
                "bytes": sum(b["data"].nbytes for b in buckets)}
