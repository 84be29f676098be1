"""raylm's transformer against transformers' reference implementations, in fp32, and its checkpoint
round trips and generation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from raylm.models.config import PRESETS, TransformerConfig, preset
from raylm.models.generate import SamplingParams, filter_logits, generate
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import (
    Transformer,
    TransformerWithScalarHead,
    document_causal_mask,
    document_positions,
    flops_per_token,
)

VOCAB = 512

# (name, config overrides, transformers class the checkpoint must load as)
FAMILIES = [
    ("dense", dict(), "LlamaForCausalLM"),
    ("dense-untied-mha", dict(tie_embeddings=False, n_kv_heads=4), "LlamaForCausalLM"),
    ("moe", dict(n_experts=4, top_k=2, moe_ffn_dim=96), "MixtralForCausalLM"),
    ("moe-shared", dict(n_experts=4, top_k=2, moe_ffn_dim=96, n_shared_experts=1, router_norm_topk=False),
     "Qwen2MoeForCausalLM"),
]


def make_model(seed=0, **overrides) -> Transformer:
    cfg = preset("debug", vocab_size=VOCAB, **{"initializer_range": 0.1, **overrides})
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.eval()


@pytest.mark.parametrize("name,overrides,hf_class", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_logits_match_transformers(tmp_path, name, overrides, hf_class):
    model = make_model(**overrides)
    save_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reference).__name__ == hf_class
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - reference(tokens).logits).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs logit diff {diff}"


def test_loads_checkpoint_written_by_transformers(tmp_path):
    """Any Llama folder transformers writes loads into raylm with the same logits."""
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_cfg).eval()
    reference.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path).eval()
    tokens = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert (model(tokens) - reference(tokens).logits).abs().max().item() < 1e-4


def test_reward_head_matches_sequence_classification(tmp_path):
    cfg = preset("debug", vocab_size=VOCAB, initializer_range=0.1)
    model = TransformerWithScalarHead(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_checkpoint(model, tmp_path)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reference).__name__ == "LlamaForSequenceClassification"
    tokens = torch.randint(3, VOCAB, (3, 16))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 10:] = False  # right padding: the score is read at the last real token
    mask[2, 5:] = False
    tokens[~mask] = cfg.pad_token_id
    with torch.no_grad():
        ours = model.sequence_scores(tokens, mask)
        theirs = reference(tokens, attention_mask=mask.long()).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() < 1e-4
    reloaded = load_checkpoint(tmp_path)
    assert isinstance(reloaded, TransformerWithScalarHead)
    with torch.no_grad():
        assert torch.equal(reloaded.sequence_scores(tokens, mask), ours)


def test_reward_model_starts_from_causal_lm_checkpoint(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path)
    reward = load_checkpoint(tmp_path, scalar_head=True)
    assert torch.equal(reward.model.tok_embeddings.weight, model.tok_embeddings.weight)
    assert torch.count_nonzero(reward.score.weight) == 0


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_checkpoint_round_trip_is_exact(tmp_path, overrides):
    model = make_model(**overrides)
    save_checkpoint(model, tmp_path)
    reloaded = load_checkpoint(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.config == model.config


def test_checkpoint_is_safetensors_only(tmp_path):
    save_checkpoint(make_model(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_generation_with_kv_cache_equals_without(overrides):
    model = make_model(**overrides, eos_token_id=VOCAB - 1)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3] * 9, [42]]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    cached = generate(model, prompts, greedy)
    assert cached == generate(model, prompts, greedy, use_cache=False)
    assert len({t for row in cached for t in row}) > 10, "degenerate model: the test would prove nothing"
    # Left padding changes nothing: each prompt alone gives the same continuation.
    assert [generate(model, [p], greedy)[0] for p in prompts] == cached
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(model, prompts, sampled, torch.Generator().manual_seed(3))
    b = generate(model, prompts, sampled, torch.Generator().manual_seed(3), use_cache=False)
    assert a == b


def test_generation_stops_on_eos():
    model = make_model()
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    first = generate(model, [[7, 8, 9]], greedy)[0]
    stopper = make_model(eos_token_id=first[2])  # the third generated token becomes EOS
    out = generate(stopper, [[7, 8, 9], [20, 21]], greedy)
    assert out[0] == first[:3]
    assert len(out[1]) <= 12


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)[0, :2]).any()
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(filter_logits(logits, top_k=0, top_p=0.8)[0])
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:2].sum() >= 0.8 > probs[:1].sum()
    assert (~torch.isinf(filter_logits(logits, 0, 0.01)[0])).sum() == 1  # the top token always stays


def test_packed_documents_do_not_attend_across_boundaries():
    model = make_model()
    a, b = torch.randint(3, VOCAB, (1, 7)), torch.randint(3, VOCAB, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = document_positions(doc_ids)
    assert positions.tolist() == [list(range(7)) + list(range(5))]
    with torch.no_grad():
        out = model(packed, positions=positions, attn_mask=document_causal_mask(doc_ids))
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_presets_and_flops():
    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        assert model.num_params(active=True) <= model.num_params()
    debug = preset("debug")
    assert 0.8e6 < Transformer(debug).num_params() < 2e6  # "~1M" debug size
    with torch.device("meta"):
        assert 0.9e9 < Transformer(preset("1b")).num_params() < 1.2e9
    # 6 FLOPs per matmul weight plus attention: check against a direct count for the debug model.
    d, L, V, T = debug.dim, debug.n_layers, debug.vocab_size, 256
    per_layer = d * (debug.n_heads + 2 * debug.n_kv_heads) * debug.head_dim + d * d + 3 * d * debug.ffn_dim
    assert flops_per_token(debug, T) == 6 * (L * per_layer + d * V) + 12 * L * d * T


@pytest.mark.parametrize(
    "overrides,field",
    [(dict(dim=130), "n_heads"), (dict(n_kv_heads=3), "n_kv_heads"), (dict(n_experts=2, top_k=3), "top_k"),
     (dict(vocab_size=2), "eos_token_id"), (dict(n_shared_experts=1), "n_shared_experts"),
     (dict(n_experts=4, router_norm_topk=False), "router_norm_topk")],
)
def test_impossible_architectures_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TransformerConfig(**{**PRESETS["debug"], **overrides})
