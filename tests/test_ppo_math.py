"""raylm.rl.ppo and the PPO losses of raylm.train.losses against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from raylm.rl.ppo import (
    AdaptiveKLController,
    aggregate,
    informative_groups,
    truncated_importance_weights,
    truncated_responses,
    RunningMoments,
    gae,
    group_advantages,
    kl_estimate,
    kl_penalised_rewards,
    normalise_scores,
    whiten,
)
from raylm.train.losses import clipped_policy_loss, clipped_value_loss, entropy_from_logits


def test_gae_on_a_tiny_example_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - 0.7 = 0.3;  d1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.5 * 0.3 = 0.25;
    #        d0 = 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.5 * 0.25 = 0.225
    # row 1: the padded token (reward 5, value 9) is ignored: d1 = 2 - 1 = 1; d0 = 1 - 1 = 0, A0 = 0.5
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3], [0.5, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0], [1.5, 2.0, 0.0]]))
    # lam = 1: the advantage is the discounted return minus the value. gamma 0.9 at t=0: 0.81 - 0.5
    advantages, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.31, 0.3, 0.3]]))


def test_kl_estimators_by_hand_and_unbiased():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))  # log p/q
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # r = q/p = 0.5: (r-1) - log r
    assert kl_estimate(ref, logp, "k3").item() >= 0
    # Over tokens sampled from p, k1 and k3 average to KL(p || q).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for estimator in ("k1", "k3"):
        mc = kl_estimate(p.log()[tokens], q.log()[tokens], estimator).mean().item()
        assert mc == pytest.approx(exact, abs=5e-3), estimator
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k9")


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = kl_penalised_rewards(scores, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]]))


def test_clipped_policy_loss_and_its_gradient():
    old = torch.zeros(4)
    logprobs = torch.tensor([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = clipped_policy_loss(logprobs, old, advantages, torch.ones(4), clip_eps=0.2)
    # token 0: r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)   token 1: r 0.5, A +1: max(-0.5, -0.8) = -0.5
    # token 2: r 0.5, A -1: max(0.5, 0.8) = 0.8 (clipped)      token 3: r 1.5, A -1: max(1.5, 1.2) = 1.5
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    out.loss.backward()
    # Clipped tokens get no gradient; the others d/dlogp (-A r) / 4 = -A r / 4.
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, -0.5 / 4, 0.0, 1.5 / 4]))
    # Masked tokens do not count.
    masked = clipped_policy_loss(logprobs.detach(), old, advantages, torch.tensor([1, 1, 0, 0]), clip_eps=0.2)
    assert masked.loss.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss():
    values = torch.tensor([1.5, 1.5], requires_grad=True)
    old = torch.tensor([1.0, 1.0])
    returns = torch.tensor([2.0, 1.0])
    loss, fraction = clipped_value_loss(values, old, returns, torch.ones(2), clip_eps=0.2)
    # token 0: (1.5-2)^2 = 0.25 vs clipped v 1.2: (1.2-2)^2 = 0.64 -> 0.64
    # token 1: (1.5-1)^2 = 0.25 vs (1.2-1)^2 = 0.04 -> 0.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    assert fraction.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.5 * 2 * 0.5 / 2]))  # clipped: no gradient
    plain, _ = clipped_value_loss(values.detach(), old, returns, torch.ones(2), clip_eps=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.25) / 2)


def test_whitening_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    std = math.sqrt(5 / 3)  # unbiased variance of 1..4: (2.25 + 0.25 + 0.25 + 2.25) / 3
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / std
    torch.testing.assert_close(whiten(x, torch.ones_like(x)), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whiten(x, torch.ones_like(x), shift_mean=False), expected + 2.5, atol=1e-6, rtol=1e-6)
    padded = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    torch.testing.assert_close(whiten(padded, torch.tensor([[1, 1], [1, 0]])), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                               atol=1e-6, rtol=1e-6)  # mean 2, variance 1


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12 is 100% over target; the error is clipped to +0.2: 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.1 * 1.00512)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(5.4, n_steps=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))  # 10% under
    assert ctl.update(0.0, n_steps=1000) == pytest.approx(0.1 * 0.99 * 0.98)  # clipped at -0.2


def test_group_baselines():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # GRPO: group 1 mean 2, std 1; group 2 mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    s12 = math.sqrt(12)
    torch.testing.assert_close(group_advantages(scores, 3, "grpo", eps=0.0),
                               torch.tensor([-1.0, 0.0, 1.0, -2 / s12, -2 / s12, 4 / s12]))
    # RLOO: each score minus the mean of the other two
    torch.testing.assert_close(group_advantages(scores, 3, "rloo"), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(scores, 4)


def test_group_advantages_never_scale_the_kl_penalty_by_the_scores_spread():
    """kl.mode: reward with a group baseline: the penalty is centred in its group and subtracted after
    the scores are normalised. A group scored all alike carries only the (small) penalty's spread."""
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    penalty = torch.tensor([0.02, 0.01, 0.03, 0.0, 0.01, 0.01, 0.03, 0.03])
    got = group_advantages(scores, 4, "grpo", kl_penalty=penalty).view(2, 4)
    torch.testing.assert_close(got[0], -(penalty[:4] - 0.015), atol=1e-6, rtol=0)  # no unit-size noise
    plain = group_advantages(scores, 4, "grpo").view(2, 4)[1]
    torch.testing.assert_close(got[1], plain - (penalty[4:] - 0.02), atol=1e-6, rtol=0)
    assert got[1, 0] > 0 > got[1, 1]  # the task reward still decides the informative group
    # RLOO: the penalty against the mean of the group's other samples, as the scores are
    torch.testing.assert_close(group_advantages(scores, 4, "rloo", kl_penalty=penalty),
                               group_advantages(scores - penalty, 4, "rloo"))
    # the old way (the penalty inside the normalised score) turns the KL's noise into +-1 advantages
    assert group_advantages(scores - penalty, 4, "grpo").view(2, 4)[0].abs().max() > 1.0


def test_reward_normalisation_uses_running_moments_and_clips():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert moments.mean == pytest.approx(3.0) and moments.var == pytest.approx(2.0)  # as one batch of 1..5
    moments = RunningMoments()
    out = normalise_scores(torch.tensor([0.0, 10.0]), moments, clip=0.5)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.5]))  # mean 5, std 5 -> -1, 1 -> clipped
    torch.testing.assert_close(normalise_scores(torch.tensor([3.0, -9.0]), None, clip=2.0), torch.tensor([2.0, -2.0]))


def test_entropy():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(torch.tensor([0.0, -1e9])).item() == pytest.approx(0.0, abs=1e-6)


def test_response_logprobs_are_those_of_the_temperature_scaled_distribution():
    from raylm.rl.ppo import response_index, response_logits_and_logprobs

    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]])  # [B=1, T=3, V=3]
    tokens = torch.tensor([[0, 1, 2]])
    index = response_index(torch.tensor([1]), 2, 3)  # the response is tokens 1, 2: read at positions 0, 1
    scaled, logprobs = response_logits_and_logprobs(logits, tokens, index, temperature=0.5)
    # position 0 at T=0.5: logits (4, 0, 2), token 1: 0 - log(e^4 + 1 + e^2)
    assert logprobs[0, 0].item() == pytest.approx(-math.log(math.exp(4) + 1 + math.exp(2)))
    assert scaled[0, 1].tolist() == [0.0, 6.0, 0.0]
    with pytest.raises(ValueError, match="temperature"):
        response_logits_and_logprobs(logits, tokens, index, temperature=0.0)


def test_asymmetric_clipping_lets_the_ratio_rise_further_than_it_falls():
    old = torch.zeros(4)
    logprobs = torch.tensor([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = clipped_policy_loss(logprobs, old, advantages, torch.ones(4), clip_eps=0.2, clip_high=0.6)
    # ratio clipped to [0.8, 1.6]: token 0 (r 1.5, A +1) is no longer clipped: -1.5; token 2 still is: 0.8
    assert out.loss.item() == pytest.approx((-1.5 - 0.5 + 0.8 + 1.5) / 4)
    assert out.clip_fraction.item() == pytest.approx(0.25)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([-1.5 / 4, -0.5 / 4, 0.0, 1.5 / 4]))
    # clip_high None is the symmetric clip of before
    same = clipped_policy_loss(logprobs.detach(), old, advantages, torch.ones(4), clip_eps=0.2, clip_high=None)
    assert same.loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)


def test_token_and_sequence_loss_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row masked out entirely (overlong)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2 + 10) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(per_token, mask, "sum")
    # through the surrogate: r = 1 everywhere, so the loss is -A aggregated
    advantages = -per_token
    zeros = torch.zeros(3, 3)
    out = clipped_policy_loss(zeros, zeros, advantages, mask, aggregation="sequence_mean")
    assert out.loss.item() == pytest.approx(6.0)
    # per-token importance weights scale each token's term
    weights = torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    out = clipped_policy_loss(zeros, zeros, advantages, mask, weights=weights)
    assert out.loss.item() == pytest.approx((0.5 + 2 + 6 + 10) / 4)


def test_dynamic_sampling_finds_the_groups_with_a_signal():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert informative_groups(scores, 4).tolist() == [False, True, False]
    # the all-equal groups are exactly those whose GRPO advantages are all zero
    advantages = group_advantages(scores, 4).view(3, 4)
    assert (advantages.abs().sum(-1) > 0).tolist() == [False, True, False]


def test_overlong_responses_are_those_the_length_limit_cut():
    end = 5
    responses = [[1, 2, 3, end], [1, 2, 3, 4], [1, 2], [1, 2, 3, 4, 4]]
    assert truncated_responses(responses, [end], max_new_tokens=4).tolist() == [False, True, False, True]


def test_truncated_importance_weights_by_hand():
    trainer = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    engine = torch.tensor([[math.log(0.25), math.log(0.3), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights, stats = truncated_importance_weights(trainer, engine, mask, cap=2.5)
    # exp(trainer - engine): 2.0 and 3.0 -> capped at 2.5; padding 0
    torch.testing.assert_close(weights, torch.tensor([[2.0, 2.5, 0.0]]))
    assert stats["is_weight/mean"] == pytest.approx(2.25)
    assert stats["is_weight/max"] == pytest.approx(3.0)
    assert stats["is_weight/truncated_fraction"] == pytest.approx(0.5)
