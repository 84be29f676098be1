"""Every training objective of raylm as a loss over one batch, in one place: next-token
cross-entropy (pretraining, SFT), Bradley-Terry (reward model), DPO / IPO, and PPO's policy and
value losses. Free of Ray and of parallelism: the engine (``raylm.train.engine``) runs them.

Sums, not means, where ranks and micro-batches hold different numbers of items (tokens): the
loop divides by the global count once, so the step's loss is the exact mean over the whole step.
The rollout-side PPO math (KL estimators, GAE, group baselines) is in ``raylm.rl.ppo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raylm.rl.ppo import aggregate, kl_estimate, masked_mean

IGNORE_INDEX = -100


# ---- language modelling (pretraining, SFT) ---------------------------------------------------

def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled positions of -log p(label): [B, T, V] logits, [B, T] labels (already
    shifted; -100 on prompt and padding)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


# ---- preferences (reward model, DPO) -----------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) (the margin asks for a wider gap)."""
    return -F.logsigmoid(chosen - rejected - margin)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> dict:
    """Per-pair DPO or IPO loss from summed response log-probs, with the implicit rewards.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r));
    sigmoid (DPO): -log sigmoid(beta * h); ipo: (h - 1 / (2 beta))^2."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss: unknown kind {kind!r} (sigmoid or ipo)")
    return {"loss": loss, "chosen_rewards": beta * chosen_ratio.detach(), "rejected_rewards": beta * rejected_ratio.detach()}


def sequence_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled positions of log p(label | prefix): [B]. Right padding needs no mask
    (causal attention never looks right), and its labels are -100."""
    logits = model(tokens).float()
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def agreement(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen answer wins, 0 where it loses, 1/2 on a tie (a zero-initialised head, or a
    policy still equal to its reference, ties every pair: chance, not failure)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def reward_pair_outputs(model, tokens, attention_mask, margin) -> dict:
    """Bradley-Terry over one batch of pairs (chosen rows first, then rejected): the per-pair loss
    and what is logged about it."""
    scores = model.sequence_scores(tokens, attention_mask).float()
    n = len(scores) // 2
    chosen, rejected = scores[:n], scores[n:]
    loss = bradley_terry_loss(chosen, rejected, margin)
    return {"loss": loss, "correct": agreement(chosen - rejected), "margin": (chosen - rejected).detach(),
            "chosen": chosen.detach(), "rejected": rejected.detach()}


def dpo_pair_outputs(logps: torch.Tensor, reference: torch.Tensor, beta: float, kind: str,
                     answer_tokens: torch.Tensor | None = None, nll_weight: float = 0.0) -> dict:
    """DPO / IPO over one batch of pairs from the policy's summed log-probs [2n] (chosen, then
    rejected) and the reference's [n, 2]: the per-pair loss and what is logged about it.

    ``nll_weight`` > 0 adds the chosen answer's per-token negative log-likelihood (``answer_tokens``
    [2n] labelled tokens per row), weighted, to each pair's loss: RPO (Pang et al. 2024), which keeps
    the chosen answers likely while the ratio term pushes the pair apart."""
    n = len(logps) // 2
    out = dpo_loss(logps[:n], logps[n:], reference[:, 0], reference[:, 1], beta, kind)
    reward_margin = out["chosen_rewards"] - out["rejected_rewards"]
    logp_margin = (logps[:n] - logps[n:]).detach()
    loss = out["loss"]
    if nll_weight > 0:
        if answer_tokens is None:
            raise ValueError("dpo_pair_outputs: nll_weight needs answer_tokens")
        loss = loss + nll_weight * (-logps[:n] / answer_tokens[:n].clamp(min=1))
    return {"loss": loss, "correct": agreement(logp_margin), "margin": logp_margin,
            "reward_correct": agreement(reward_margin), "reward_margin": reward_margin,
            "chosen": out["chosen_rewards"], "rejected": out["rejected_rewards"],
            "logp_chosen": logps[:n].detach(), "logp_rejected": logps[n:].detach()}


# ---- PPO (policy, value) ---------------------------------------------------------------------------

@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped branch of the surrogate is taken
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new) over the minibatch


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2, clip_high: float | None = None,
                        aggregation: str = "token_mean", weights: torch.Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps_high)) per token, r = p/p_old,
    aggregated over tokens (``raylm.rl.ppo.aggregate``). ``clip_high`` (None: ``clip_eps``) clips
    the ratio's rise apart from its fall (DAPO's clip-higher); ``weights``: per-token importance
    weights, constants (truncated IS for rollouts the engine sampled)."""
    high = clip_eps if clip_high is None else clip_high
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_eps: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean over tokens of max((v - R)^2, (v_clip - R)^2) with v_clip = v_old + clip(v - v_old,
    +-eps); ``clip_eps=None`` is the plain squared error. Returns (loss, fraction of tokens clipped)."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: [..., V] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def ppo_policy_loss(logits: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, entropy_coef: float = 0.0,
                    ref_logprobs: torch.Tensor | None = None, kl_loss_coef: float = 0.0,
                    kl_estimator: str = "k3", clip_high: float | None = None, aggregation: str = "token_mean",
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The policy's whole PPO loss over one minibatch: the clipped surrogate, minus the entropy
    bonus, plus the KL to the reference when the KL is a loss. -> (loss, logged numbers)."""
    out = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_high, aggregation, weights)
    loss = out.loss
    with torch.set_grad_enabled(entropy_coef > 0):
        entropy = masked_mean(entropy_from_logits(logits), mask)
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    stats = {"policy/loss": out.loss.item(), "policy/clip_fraction": float(out.clip_fraction),
             "policy/approx_kl": float(out.approx_kl), "policy/entropy": entropy.item()}
    if kl_loss_coef > 0:
        kl = masked_mean(kl_estimate(logprobs, ref_logprobs, kl_estimator), mask)
        loss = loss + kl_loss_coef * kl
        stats["policy/kl_loss"] = kl.item()
    return loss, stats
