"""Router, dispatch and auxiliary losses of the Mixture-of-Experts layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raylm.models.config import preset
from raylm.models.moe import MoE, load_balancing_loss, router_z_loss
from raylm.models.transformer import Transformer, causal_lm_loss


def make_moe(seed=0, **overrides) -> MoE:
    cfg = preset("moe-debug", **overrides)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return layer


def per_token_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE output computed token by token, straight from the definition."""
    out = torch.zeros_like(x)
    probs = (x @ layer.router.gate.weight.t()).float().softmax(-1)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(layer.top_k)
        if layer.router.norm_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            gate, up = (x[t] @ layer.experts.w13[e]).chunk(2)
            out[t] += w * ((F.silu(gate) * up) @ layer.experts.w2[e])
    return out


def test_router_picks_the_top_k_experts():
    layer = make_moe(n_experts=8, top_k=3)
    x = torch.randn(50, layer.router.gate.in_features)
    routing = layer.router(x)
    expected = (x @ layer.router.gate.weight.t()).softmax(-1).topk(3).indices
    assert torch.equal(routing.experts.sort(-1).values, expected.sort(-1).values)
    assert torch.allclose(routing.weights.sum(-1), torch.ones(50))


def test_dropless_dispatch_conserves_tokens_and_matches_reference():
    layer = make_moe(n_experts=4, top_k=2)
    x = torch.randn(64, layer.router.gate.in_features)
    with torch.no_grad():
        out = layer(x)
    assert int(layer.tokens_per_expert.sum()) == 64 * 2  # every token reaches exactly top_k experts
    assert layer.dropped_tokens == 0
    # fp32, summed in another order than the grouped matmul: |out| reaches ~40, so 1e-4 is ~1e-6 relative
    torch.testing.assert_close(out, per_token_reference(layer, x), rtol=1e-4, atol=1e-4)


def test_shared_expert_and_unnormalised_router():
    layer = make_moe(n_experts=4, top_k=2, n_shared_experts=1, router_norm_topk=False)
    x = torch.randn(16, layer.router.gate.in_features)
    with torch.no_grad():
        shared = torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
        assert torch.allclose(layer(x), per_token_reference(layer, x) + shared, atol=1e-5)


def test_capacity_drops_the_latest_tokens_over_capacity():
    layer = make_moe(n_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # route every token to expert 0
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0].fill_(1.0)
    x = torch.rand(8, layer.router.gate.in_features) + 0.1
    capacity = math.ceil(1.0 * 8 * 1 / 4)
    with torch.no_grad():
        out = layer(x)
    assert layer.dropped_tokens == 8 - capacity
    assert int(layer.tokens_per_expert[0]) == 8  # counts report demand, before dropping
    assert torch.count_nonzero(out[capacity:].abs().sum(-1)) == 0  # dropped tokens get no expert output
    assert torch.count_nonzero(out[:capacity].abs().sum(-1)) == capacity


def test_gradients_reach_every_used_expert_and_only_those():
    layer = make_moe(n_experts=4, top_k=2)
    with torch.no_grad():  # every token's top two are experts 0 and 1
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, :2] = torch.tensor([5.0, 2.0])
        layer.router.gate.weight[1, :2] = torch.tensor([2.0, 5.0])
    x = torch.zeros(6, layer.router.gate.in_features)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    layer(x).square().sum().backward()
    per_expert = layer.experts.w13.grad.abs().sum(dim=(1, 2))
    assert (per_expert[:2] > 0).all() and (per_expert[2:] == 0).all()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    n_experts = 4
    uniform = torch.full((8, n_experts), 1 / n_experts)
    balanced = torch.arange(8).remainder(n_experts)[:, None]
    assert load_balancing_loss(uniform, balanced, n_experts).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    skewed = torch.zeros(8, 1, dtype=torch.long)
    assert load_balancing_loss(skewed_probs, skewed, n_experts).item() == pytest.approx(4 * 0.7)


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = ((math.log(2)) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_model_aux_loss_and_expert_counts_reach_the_loss():
    cfg = preset("moe-debug", vocab_size=256, load_balance_coef=0.1, router_z_coef=0.01)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    tokens = torch.randint(0, 256, (2, 32))
    out = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])
    layers = model.moe_layers()
    assert len(layers) == cfg.n_layers
    expected_aux = sum(0.1 * m.load_balance_loss + 0.01 * m.z_loss for m in layers)
    assert torch.allclose(out.aux_loss, expected_aux)
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    assert all(int(m.tokens_per_expert.sum()) == 2 * 31 * cfg.top_k for m in layers)
    out.loss.backward()
    assert all(m.router.gate.weight.grad.abs().sum() > 0 for m in layers)
