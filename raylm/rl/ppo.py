"""The tensor math of PPO for language models, free of Ray and of models.

Every per-token tensor is ``[B, R]``: row ``b`` is one response, column ``t`` its ``t``-th generated
token, ``mask`` 1 on real tokens and 0 on right padding. ``values[b, t]`` is the critic's estimate
before token ``t`` is generated; ``logprobs[b, t]`` the log-probability of that token.

- KL estimators between the policy and the reference, per token (Schulman, "Approximating KL
  divergence"): ``k1 = log p - log q`` (unbiased, can be negative), ``k2 = (log p - log q)^2 / 2``,
  ``k3 = (q/p - 1) - log(q/p)`` (unbiased and never negative).
- Rewards: the reward model's score (normalised with running moments, clipped) on the last token,
  minus ``kl_coef * KL`` on every token when the KL is a reward penalty.
- GAE advantages and returns; advantage whitening.
- (The PPO clipped surrogate, the clipped value loss and the entropy bonus are objectives: in
  ``raylm.train.losses``.)
- The adaptive KL controller of Ziegler et al. (2019).
- Critic-free group baselines: GRPO (group mean and std) and RLOO (leave-one-out mean).
"""

from __future__ import annotations

import math
import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (Bessel's correction, as numpy's ``ddof=1``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; ``shift_mean=False`` keeps the mean (scales only).
    Padding entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- response tokens in a batch of sequences -----------------------------------------------

def response_index(prompt_lens: torch.Tensor, width: int, seq_len: int) -> torch.Tensor:
    """[B] prompt lengths -> [B, width]: the positions of right-padded sequences (prompt then
    response) whose outputs predict response tokens 0..width-1 (position ``prompt_len - 1 + t``).
    Entries past a row's end are clamped inside the sequence; the response mask hides them."""
    t = torch.arange(width, device=prompt_lens.device)
    return (prompt_lens[:, None] - 1 + t).clamp(max=seq_len - 2)


def response_logits_and_logprobs(logits: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor,
                                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] logits of [B, T] tokens -> ([B, R, V] logits at the response positions, [B, R]
    log-probabilities of the response tokens), in float32, both divided by ``temperature``: the
    policy PPO optimises is the distribution the rollouts were sampled from, softmax(logits / T)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); greedy decoding has no log-probabilities to train on")
    picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])).float()
    if temperature != 1.0:
        picked = picked / temperature
    targets = tokens.gather(1, index + 1)
    return picked, picked.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


# ---- KL between policy and reference ------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs."""
    log_ratio = logprobs - ref_logprobs  # log p/q, tokens sampled from p
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # r = q/p: (r - 1) - log r >= 0. Clamped so that one outlier token cannot overflow exp.
        neg = (-log_ratio).clamp(max=20.0)
        return neg.exp() - 1 - neg
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k2, k3")


def kl_penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """[B] sequence scores and [B, R] per-token KL -> [B, R] rewards: ``-kl_coef * KL`` on every
    token, plus the score on each row's last real token."""
    rewards = -kl_coef * kl * mask
    last = mask.long().sum(-1).clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


class RunningMoments:
    """Running mean and standard deviation of reward-model scores over the whole run (Chan et al.'s
    parallel update), for reward normalisation that does not depend on one batch."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def normalise_scores(scores: torch.Tensor, moments: RunningMoments | None, clip: float | None) -> torch.Tensor:
    """Update the running moments with this batch, then (score - mean) / std, then clip to +-clip."""
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


# ---- advantages ---------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; the state after the last real token is
    terminal (value 0). Returns (advantages, returns = advantages + values), both 0 on padding."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # On padding nothing accumulates, so the last real token sees a terminal next state.
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, baseline: str = "grpo", eps: float = 1e-6,
                     kl_penalty: torch.Tensor | None = None) -> torch.Tensor:
    """Critic-free sequence advantages for ``group_size`` samples per prompt, consecutive in ``scores``.

    ``grpo``: (score - group mean) / (group std + eps), std with Bessel's correction;
    ``rloo``: score - mean of the group's other samples.

    ``kl_penalty`` (each sample's KL coefficient x summed KL, ``kl.mode: reward``) is subtracted after
    the scores are normalised, against its group's own baseline and never divided by the scores'
    spread: in a group whose samples all score alike (std 0), dividing would blow the KL's sampling
    noise up into unit-size advantages that outweigh every informative group."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("group baselines need at least 2 samples per prompt")
    if baseline not in ("grpo", "rloo"):
        raise ValueError(f"unknown group baseline {baseline!r}; known: grpo, rloo")

    def centred(values: torch.Tensor) -> torch.Tensor:
        groups = values.view(-1, group_size).double()
        out = groups - groups.mean(-1, keepdim=True)
        return out * group_size / (group_size - 1) if baseline == "rloo" else out

    out = centred(scores)
    if baseline == "grpo":
        out = out / (scores.view(-1, group_size).double().std(-1, keepdim=True) + eps)
    if kl_penalty is not None:
        out = out - centred(kl_penalty)
    return out.view(-1).to(scores.dtype)


# ---- adaptive KL --------------------------------------------------------------------------

class AdaptiveKLController:
    """Ziegler et al. (2019): move ``value`` so the observed KL tracks ``target``:
    e = clip(KL / target - 1, -0.2, 0.2);  value *= 1 + e * n_steps / horizon."""

    def __init__(self, init_value: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_value, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ---- the GRPO family's options ------------------------------------------------------------

def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """[B, R] per-token losses -> one number.

    ``token_mean``: the mean over every real token of the batch (each token weighs the same, so long
    responses weigh more: DAPO's choice); ``sequence_mean``: each response's token mean, then the
    mean over responses (each response weighs the same: the GRPO paper's). A row with no real token
    (masked out entirely, e.g. by overlong filtering) does not count in either."""
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "sequence_mean":
        mask = mask.to(per_token.dtype)
        counts = mask.sum(-1)
        rows = counts > 0
        per_row = (per_token * mask).sum(-1) / counts.clamp(min=1)
        return per_row[rows].sum() / rows.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: token_mean, sequence_mean")


def informative_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """[B] scores of consecutive groups -> [B / group_size] bool: the groups whose scores are not all
    equal. A group whose samples all score the same has zero group-normalised advantage: no signal
    (DAPO's dynamic sampling drops it)."""
    groups = scores.view(-1, group_size)
    return (groups.max(-1).values - groups.min(-1).values) > tol


def truncated_responses(responses: list[list[int]], stop_ids: list[int], max_new_tokens: int) -> torch.Tensor:
    """[B] bool: the responses the length limit cut (``max_new_tokens`` long, no stop token at the end)."""
    stops = set(stop_ids)
    return torch.tensor([len(r) >= max_new_tokens and (not r or r[-1] not in stops) for r in responses])


def truncated_importance_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                                 mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling for the trainer/engine mismatch: the rollouts were sampled by the
    engine (another numerics, or older weights when rollouts run ahead), the loss is the trainer's.
    Per token ``w = min(exp(trainer - engine), cap)`` (0 on padding), with its statistics."""
    log_ratio = (trainer_logprobs - engine_logprobs).clamp(max=20.0)
    raw = log_ratio.exp()
    weights = raw.clamp(max=cap) * mask
    stats = {"is_weight/mean": masked_mean(weights, mask).item(),
             "is_weight/max": (raw * mask).max().item() if mask.any() else 0.0,
             "is_weight/truncated_fraction": masked_mean((raw > cap).float(), mask).item()}
    return weights, stats
