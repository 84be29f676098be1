"""Hugging Face checkpoint folders: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

The families raylm loads are Llama (with llama3 / linear / yarn / dynamic RoPE scaling), Mistral, Qwen2
(q/k/v biases), Qwen3 (per-head q/k norms, explicit head_dim), OLMo2 (post-norm blocks, q/k norms
over the whole projection), and the MoE families Mixtral, Qwen2-MoE and Qwen3-MoE: one plain model
whose knobs (models/config.py) cover their differences, plus the name adapter below. A config field
that changes the numerics and that raylm does not implement is refused, naming it.

A checkpoint brought in is saved back in its own family (``TransformerConfig.hf_model_type``).
A model raylm built is saved as ``LlamaForCausalLM``; a Mixture-of-Experts model as
``MixtralForCausalLM`` (no shared expert) or ``Qwen2MoeForCausalLM`` (with the sigmoid-gated
shared expert); a scalar-head model as the matching ``...ForSequenceClassification`` with one
label. transformers and vLLM load these as they load any hub checkpoint, and raylm loads any such
folder back (its own, or one written by transformers). Weights travel only through safetensors:
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FAMILY_BLOCKS, TransformerConfig
from .transformer import Transformer, TransformerWithScalarHead

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# The Hugging Face families (config.json's model_type) raylm loads and exports, by class-name prefix.
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "Olmo2",
                 "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}
SUPPORTED_MODEL_TYPES = tuple(_CLASS_PREFIX)

# config.json keys that never change a forward pass: metadata, generation defaults, label names.
_METADATA_KEYS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "output_router_logits", "router_aux_loss_coef", "_attn_implementation_autoset",
    "pretraining_tp",  # Llama's sliced matmuls: the same products, summed in another order
    "bos_token_id", "eos_token_id", "pad_token_id", "raylm",
}
# Keys raylm maps onto TransformerConfig, for every family ...
_MAPPED_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout",
}
# ... and for some families only (checked for their no-op values in config_from_hf).
_FAMILY_KEYS = {
    "llama": set(),
    "mistral": {"sliding_window"},
    "qwen2": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "use_mrope"},
    "qwen3": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "olmo2": set(),
    "mixtral": {"sliding_window", "num_local_experts", "num_experts_per_tok", "router_jitter_noise"},
    "qwen2_moe": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "qkv_bias", "num_local_experts"},
    "qwen3_moe": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "moe_intermediate_size",
                  "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                  "num_local_experts"},
}
# rope_scaling / rope_parameters keys raylm implements, per rope type.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},  # NTK: a larger base only past max_position_embeddings, where raylm does not run
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"},
}


# Metadata a brought-in checkpoint keeps through raylm (the rest is rewritten from the config).
_KEPT_METADATA = ("tokenizer_class", "_name_or_path", "max_length", "temperature", "top_k", "top_p", "do_sample",
                  "repetition_penalty")


def architecture(cfg: TransformerConfig) -> str:
    """The Hugging Face model_type ``cfg`` is exported as: the family it came from, else raylm's choice."""
    if cfg.hf_model_type is not None:
        return cfg.hf_model_type
    if not cfg.is_moe:
        return "llama"
    return "qwen2_moe" if cfg.n_shared_experts else "mixtral"


def _rope_parameters(cfg: TransformerConfig) -> dict:
    """TransformerConfig's RoPE knobs -> Hugging Face's rope parameters (rope_type, factor, ...)."""
    out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if cfg.rope_type in ("linear", "dynamic", "llama3", "yarn"):
        out["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=original)
    elif cfg.rope_type == "yarn":
        out.update(original_max_position_embeddings=original, beta_fast=cfg.rope_beta_fast,
                   beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor is not None:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


def hf_config(cfg: TransformerConfig, scalar_head: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of ``cfg`` in its family (``architecture``), with every field that family reads."""
    arch = architecture(cfg)
    if cfg.hf_model_type is not None:
        cfg.check_family()
    rope = _rope_parameters(cfg)
    out = {
        "architectures": [_CLASS_PREFIX[arch] + ("ForSequenceClassification" if scalar_head else "ForCausalLM")],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        # transformers 5 reads rope_parameters, older versions (and vLLM's older configs) rope_scaling.
        "rope_scaling": None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_embeddings and not scalar_head,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch in ("llama", "mistral", "olmo2"):
        out["mlp_bias"] = False
    if arch == "olmo2":
        del out["head_dim"]  # OLMo2 has no head_dim field (check_family holds it at dim / n_heads)
    if arch in ("mistral", "mixtral"):
        out["sliding_window"] = None
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    if arch in ("qwen2", "qwen2_moe"):
        del out["attention_bias"]  # Qwen2's q/k/v biases are always there (zeros when raylm has none)
    if arch == "mixtral":
        out.update(
            intermediate_size=cfg.moe_ffn_dim,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.load_balance_coef,
            router_jitter_noise=0.0,
        )
    elif arch in ("qwen2_moe", "qwen3_moe"):
        out.update(
            moe_intermediate_size=cfg.moe_ffn_dim,
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            norm_topk_prob=cfg.router_norm_topk,
            router_aux_loss_coef=cfg.load_balance_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if arch == "qwen2_moe":
            out.update(shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_ffn_dim, qkv_bias=True)
    for key, value in (cfg.hf_metadata or {}).items():
        if key == "eos_token_id" and isinstance(value, list) and cfg.eos_token_id in value:
            out[key] = value  # all the end ids, raylm's own first among them
        elif key != "eos_token_id":
            out[key] = value
    if scalar_head:
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    out["raylm"] = {"capacity_factor": cfg.capacity_factor, "router_z_coef": cfg.router_z_coef,
                    "hf_model_type": cfg.hf_model_type, "attention_bias": cfg.attention_bias}
    return out


def _refuse(key: str, why: str):
    raise ValueError(f"config.json: {key}: {why}")


def _rope_from_hf(hf: dict) -> dict:
    """rope_scaling (transformers 4) or rope_parameters (5) -> TransformerConfig's RoPE knobs;
    a type or a parameter raylm does not implement is refused, naming it."""
    params = dict(hf.get("rope_parameters") or {})
    key = "rope_parameters"
    if hf.get("rope_scaling"):
        params, key = {**params, **hf["rope_scaling"]}, "rope_scaling"
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in _ROPE_KEYS:
        _refuse(f"{key}.rope_type", f"{rope_type!r} is not implemented by raylm (it has {', '.join(_ROPE_KEYS)})")
    for name, value in params.items():
        if name in ("rope_type", "type", "rope_theta") or name in _ROPE_KEYS[rope_type]:
            continue
        if name == "partial_rotary_factor" and value in (None, 1, 1.0):
            continue
        if value is not None:
            _refuse(f"{key}.{name}", f"{value!r} is not implemented by raylm for rope_type {rope_type!r}")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type == "default":
        return out
    if params.get("factor") is None:
        _refuse(f"{key}.factor", f"rope_type {rope_type!r} needs a factor")
    out["rope_factor"] = float(params["factor"])
    if params.get("original_max_position_embeddings") is not None:
        out["rope_original_max_seq_len"] = int(params["original_max_position_embeddings"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
    elif rope_type == "yarn":
        out.update(rope_beta_fast=float(params.get("beta_fast") or 32.0),
                   rope_beta_slow=float(params.get("beta_slow") or 1.0),
                   rope_truncate=bool(params.get("truncate", True)))
        if params.get("attention_factor") is not None:
            out["rope_attention_factor"] = float(params["attention_factor"])
    return out


def _check_numerics(hf: dict, arch: str) -> None:
    """Refuse, naming the key, every config.json field that would change the forward pass and that
    raylm's model does not implement; and any key raylm does not know at all."""
    known = _METADATA_KEYS | _MAPPED_KEYS | _FAMILY_KEYS[arch]
    for key in hf:
        if key not in known:
            _refuse(key, f"not a field raylm knows for model_type {arch!r} (it may change the numerics, so the "
                         f"checkpoint is refused rather than loaded without it)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", f"{act!r}: raylm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        _refuse("mlp_bias", "true: raylm's MLP has no biases")
    if hf.get("attention_bias") and arch not in ("qwen2", "qwen2_moe"):
        _refuse("attention_bias", f"true: {arch} puts a bias on the output projection too, which raylm does not have")
    if hf.get("attention_dropout"):
        _refuse("attention_dropout", f"{hf['attention_dropout']}: raylm has no dropout")
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < max_pos:
        _refuse("sliding_window", f"{window} below max_position_embeddings ({max_pos}): sliding-window attention "
                                  "is not implemented by raylm")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) and hf.get("use_sliding_window", True) and window is not None:
        _refuse("layer_types", "sliding-attention layers are not implemented by raylm")
    if hf.get("use_mrope"):
        _refuse("use_mrope", "true: multimodal rotary embeddings are not implemented by raylm")
    if hf.get("router_jitter_noise"):
        _refuse("router_jitter_noise", f"{hf['router_jitter_noise']}: raylm's router adds no noise")
    if hf.get("decoder_sparse_step", 1) != 1:
        _refuse("decoder_sparse_step", f"{hf['decoder_sparse_step']}: raylm's MoE models have experts in every layer")
    if hf.get("mlp_only_layers"):
        _refuse("mlp_only_layers", f"{hf['mlp_only_layers']}: raylm's MoE models have experts in every layer")


def config_from_hf(hf: dict) -> TransformerConfig:
    """config.json -> TransformerConfig, exact or refused: see ``_check_numerics``."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"config.json: {e.args[0]}: missing (model_type {hf.get('model_type')!r} needs it)") from None


def _config_from_hf(hf: dict) -> TransformerConfig:
    arch = hf.get("model_type")
    if arch not in _CLASS_PREFIX:
        raise ValueError(f"config.json: model_type: {arch!r} is not one raylm loads ({', '.join(_CLASS_PREFIX)})")
    _check_numerics(hf, arch)
    eos = hf.get("eos_token_id", 2)
    extra = hf.get("raylm") or {}
    block = FAMILY_BLOCKS[arch]
    metadata = {k: hf[k] for k in _KEPT_METADATA if hf.get(k) is not None}
    if isinstance(eos, list) and len(eos) > 1:  # e.g. Llama 3's end-of-text and end-of-turn ids
        metadata["eos_token_id"] = eos
    # raylm's own checkpoints say whether their Qwen2 biases are real (older ones: always zeros).
    attention_bias = block["attention_bias"] is None and bool(extra.get("attention_bias", "raylm" not in hf))
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
        attention_bias=attention_bias,
        qk_norm=block["qk_norm"],
        norm_placement=block["norm_placement"],
        hf_model_type=extra.get("hf_model_type") if "raylm" in hf else arch,
        hf_metadata=metadata or None,
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
        **_rope_from_hf(hf),
    )
    if arch == "olmo2":
        kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if arch == "mixtral":
        kwargs.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], moe_ffn_dim=hf["intermediate_size"])
    elif arch in ("qwen2_moe", "qwen3_moe"):
        kwargs.update(
            n_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the latter
            top_k=hf["num_experts_per_tok"],
            moe_ffn_dim=hf["moe_intermediate_size"],
            router_norm_topk=bool(hf.get("norm_topk_prob", False)),
        )
    if arch == "qwen2_moe":
        n_shared = hf["shared_expert_intermediate_size"] // hf["moe_intermediate_size"]
        kwargs["n_shared_experts"] = n_shared
        if n_shared * hf["moe_intermediate_size"] != hf["shared_expert_intermediate_size"]:
            _refuse("shared_expert_intermediate_size", "must be a multiple of moe_intermediate_size")
    if block["moe"]:
        kwargs.update(load_balance_coef=hf.get("router_aux_loss_coef", 0.01))
        kwargs.update({k: extra[k] for k in ("capacity_factor", "router_z_coef") if k in extra})
    try:
        return TransformerConfig(**kwargs)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def _norm_names(cfg: TransformerConfig) -> dict[str, str]:
    """raylm's two block norms -> Hugging Face names: around the input of each sublayer (pre) or
    its output (post, OLMo2)."""
    if cfg.norm_placement == "post":
        return {"attention_norm": "post_attention_layernorm", "ffn_norm": "post_feedforward_layernorm"}
    return {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _moe_names(arch: str) -> tuple[str, tuple[str, str, str]]:
    """(MoE module prefix, expert gate/up/down names) of a family."""
    if arch == "mixtral":
        return "block_sparse_moe.", ("w1", "w3", "w2")
    return "mlp.", ("gate_proj", "up_proj", "down_proj")


def to_hf_state_dict(cfg: TransformerConfig, state: dict[str, torch.Tensor], scalar_head: bool = False) -> dict:
    """raylm names and fused layouts -> Hugging Face names and per-projection tensors, in the
    family ``architecture(cfg)``."""
    arch = architecture(cfg)
    hd, nq, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    norms = _norm_names(cfg)
    moe, (gate_name, up_name, down_name) = _moe_names(arch)
    family_bias = FAMILY_BLOCKS[arch]["attention_bias"] is None  # Qwen2: biases always in the checkpoint
    if scalar_head:  # TransformerWithScalarHead keeps the backbone under "model."
        state = {k.removeprefix("model."): v for k, v in state.items()}
    out = {}

    def put(name, tensor):
        out[name] = tensor.detach().contiguous()

    for name, t in state.items():
        parts = name.split(".")
        if name == "tok_embeddings.weight":
            put("model.embed_tokens.weight", t)
        elif name == "norm.weight":
            put("model.norm.weight", t)
        elif name == "output.weight":
            if not cfg.tie_embeddings:
                put("lm_head.weight", t)
        elif name == "score.weight":
            put("score.weight", t)
        elif parts[0] == "layers":
            i, rest = parts[1], ".".join(parts[2:])
            layer = f"model.layers.{i}."
            if rest in ("attention_norm.weight", "ffn_norm.weight"):
                put(layer + norms[parts[2]] + ".weight", t)
            elif rest in ("attention.q_norm.weight", "attention.k_norm.weight"):
                put(layer + "self_attn." + parts[3] + ".weight", t)
            elif rest == "attention.wqkv.weight":
                for proj, w in zip("qkv", t.split([nq * hd, nkv * hd, nkv * hd])):
                    put(layer + f"self_attn.{proj}_proj.weight", w)
                if family_bias and not cfg.attention_bias:  # zero biases are exact
                    for proj, n in zip("qkv", (nq, nkv, nkv)):
                        put(layer + f"self_attn.{proj}_proj.bias", t.new_zeros(n * hd))
            elif rest == "attention.wqkv.bias":
                for proj, b in zip("qkv", t.split([nq * hd, nkv * hd, nkv * hd])):
                    put(layer + f"self_attn.{proj}_proj.bias", b)
            elif rest == "attention.wo.weight":
                put(layer + "self_attn.o_proj.weight", t)
            elif rest == "feed_forward.w13.weight":
                gate, up = t.chunk(2)
                put(layer + "mlp.gate_proj.weight", gate)
                put(layer + "mlp.up_proj.weight", up)
            elif rest == "feed_forward.w2.weight":
                put(layer + "mlp.down_proj.weight", t)
            elif rest == "feed_forward.router.gate.weight":
                put(layer + moe + "gate.weight", t)
            elif rest == "feed_forward.experts.w13":
                for e in range(t.shape[0]):
                    gate, up = t[e].t().chunk(2)
                    put(layer + moe + f"experts.{e}.{gate_name}.weight", gate)
                    put(layer + moe + f"experts.{e}.{up_name}.weight", up)
            elif rest == "feed_forward.experts.w2":
                for e in range(t.shape[0]):
                    put(layer + moe + f"experts.{e}.{down_name}.weight", t[e].t())
            elif rest == "feed_forward.shared_expert.w13.weight":
                gate, up = t.chunk(2)
                put(layer + "mlp.shared_expert.gate_proj.weight", gate)
                put(layer + "mlp.shared_expert.up_proj.weight", up)
            elif rest == "feed_forward.shared_expert.w2.weight":
                put(layer + "mlp.shared_expert.down_proj.weight", t)
            elif rest == "feed_forward.shared_expert_gate.weight":
                put(layer + "mlp.shared_expert_gate.weight", t)
            else:
                raise KeyError(f"no Hugging Face name for raylm parameter {name!r}")
        else:
            raise KeyError(f"no Hugging Face name for raylm parameter {name!r}")
    return out


def from_hf_state_dict(cfg: TransformerConfig, hf: dict[str, torch.Tensor], scalar_head: bool = False) -> dict:
    """Hugging Face names -> raylm names (the inverse of ``to_hf_state_dict``)."""
    arch = architecture(cfg)
    norms = _norm_names(cfg)
    moe, (gate_name, up_name, down_name) = _moe_names(arch)
    backbone = "model." if scalar_head else ""
    out = {}

    def take(name):
        if name not in hf:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return hf[name]

    out[backbone + "tok_embeddings.weight"] = take("model.embed_tokens.weight")
    out[backbone + "norm.weight"] = take("model.norm.weight")
    if scalar_head:
        out["score.weight"] = take("score.weight")
    elif not cfg.tie_embeddings:
        out["output.weight"] = take("lm_head.weight")
    else:
        out["output.weight"] = out["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"{backbone}layers.{i}."
        for ours, theirs in norms.items():
            out[dst + f"{ours}.weight"] = take(src + f"{theirs}.weight")
        if cfg.qk_norm is not None:
            for p in ("q_norm", "k_norm"):
                out[dst + f"attention.{p}.weight"] = take(src + f"self_attn.{p}.weight")
        out[dst + "attention.wqkv.weight"] = torch.cat([take(src + f"self_attn.{p}_proj.weight") for p in "qkv"])
        if cfg.attention_bias:
            out[dst + "attention.wqkv.bias"] = torch.cat([take(src + f"self_attn.{p}_proj.bias") for p in "qkv"])
        else:
            for p in "qkvo":
                bias = hf.get(src + f"self_attn.{p}_proj.bias")
                if bias is not None and bool(bias.any()):
                    raise ValueError(f"{src}self_attn.{p}_proj.bias is non-zero: this raylm config has no attention biases")
        out[dst + "attention.wo.weight"] = take(src + "self_attn.o_proj.weight")
        if not cfg.is_moe:
            out[dst + "feed_forward.w13.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")])
            out[dst + "feed_forward.w2.weight"] = take(src + "mlp.down_proj.weight")
            continue
        out[dst + "feed_forward.router.gate.weight"] = take(src + moe + "gate.weight")
        w13, w2 = [], []
        for e in range(cfg.n_experts):
            ex = src + moe + f"experts.{e}."
            w13.append(torch.cat([take(ex + f"{gate_name}.weight"), take(ex + f"{up_name}.weight")]).t())
            w2.append(take(ex + f"{down_name}.weight").t())
        out[dst + "feed_forward.experts.w13"] = torch.stack(w13)
        out[dst + "feed_forward.experts.w2"] = torch.stack(w2)
        if cfg.n_shared_experts:
            sh = src + "mlp.shared_expert."
            out[dst + "feed_forward.shared_expert.w13.weight"] = torch.cat(
                [take(sh + "gate_proj.weight"), take(sh + "up_proj.weight")]
            )
            out[dst + "feed_forward.shared_expert.w2.weight"] = take(sh + "down_proj.weight")
            out[dst + "feed_forward.shared_expert_gate.weight"] = take(src + "mlp.shared_expert_gate.weight")
    return out


def save_checkpoint(model: Transformer | TransformerWithScalarHead, path, tokenizer_file=None, dtype=None) -> Path:
    """Write ``model`` as a Hugging Face folder; copy ``tokenizer_file`` (a tokenizer.json) beside it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scalar_head = isinstance(model, TransformerWithScalarHead)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(model.config, state, scalar_head)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    save_dtype = next(iter(hf_state.values())).dtype
    save_file(hf_state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    config = hf_config(model.config, scalar_head, save_dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": model.config.bos_token_id, "eos_token_id": config["eos_token_id"],
                    "pad_token_id": model.config.pad_token_id}, indent=2)
    )
    if tokenizer_file is not None:
        write_tokenizer_files(Path(tokenizer_file), path, model.config)
    return path


TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


def write_tokenizer_files(tokenizer_json: Path, folder: Path, cfg: TransformerConfig) -> None:
    """tokenizer.json plus the tokenizer_config.json that AutoTokenizer and vLLM read. raylm's own
    tokenizer gets raylm's chat template; another checkpoint's tokenizer keeps the files beside it
    (its chat template, special tokens) as they are, so the model is served as it was trained."""
    from raylm.data.chat_template import is_raylm_tokenizer
    from raylm.data.tokenizer import RAYLM_CHAT_TEMPLATE

    raylm_own = is_raylm_tokenizer(tokenizer_json)
    if tokenizer_json.resolve() != (folder / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
        for name in TOKENIZER_SIDE_FILES if not raylm_own else ():
            if (tokenizer_json.parent / name).exists():
                shutil.copyfile(tokenizer_json.parent / name, folder / name)
    if not raylm_own and (folder / "tokenizer_config.json").exists():
        return
    vocab = json.loads(tokenizer_json.read_text())
    id_to_token = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
               "clean_up_tokenization_spaces": False}
    for key, token_id in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id), ("pad_token", cfg.pad_token_id)):
        if token_id in id_to_token:
            tok_cfg[key] = id_to_token[token_id]
    if raylm_own:
        tok_cfg["chat_template"] = RAYLM_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path / WEIGHTS_NAME]
    if not files[0].exists():
        index = path / INDEX_NAME
        if not index.exists():
            raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} (raylm reads safetensors only)")
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def load_config(path) -> tuple[TransformerConfig, bool]:
    """-> (architecture, whether the checkpoint is a scalar-head model)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
    hf = json.loads(config_file.read_text())
    scalar_head = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures", []))
    return config_from_hf(hf), scalar_head


@contextmanager
def skipped_init():
    """Module constructors skip ``torch.nn.init``'s random filling, for a model whose parameters are
    replaced at once: its parameters are allocated but never written. (Building on the meta device
    instead costs ~1 s per process: torch's meta ``normal_`` and ``arange`` import torch._dynamo.)"""
    names = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_checkpoint(path, scalar_head: bool | None = None, device="cpu", dtype=torch.float32):
    """Load a Hugging Face folder as a raylm ``Transformer`` (or ``TransformerWithScalarHead``).

    ``scalar_head=True`` on a causal-LM checkpoint builds a scalar-head model on its backbone with a
    fresh zero head (how a reward model starts from an SFT checkpoint)."""
    path = Path(path)
    cfg, is_scalar = load_config(path)
    want_scalar = is_scalar if scalar_head is None else scalar_head
    tensors = read_safetensors(path)
    if want_scalar and not is_scalar:
        tensors = {**tensors, "score.weight": torch.zeros(1, cfg.dim)}
    if not want_scalar and is_scalar:
        raise ValueError(f"{path}: a scalar-head checkpoint has no language-model head")
    with skipped_init():  # RoPE tables (not saved) are built here; every parameter is assigned below
        model = TransformerWithScalarHead(cfg) if want_scalar else Transformer(cfg)
    state = from_hf_state_dict(cfg, tensors, want_scalar)
    model.load_state_dict(state, strict=True, assign=True)
    if not want_scalar and cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)
