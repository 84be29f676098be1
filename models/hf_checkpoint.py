"""Hugging Face checkpoint folders: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

A dense model is saved as ``LlamaForCausalLM``; a Mixture-of-Experts model as
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

from .config import TransformerConfig
from .transformer import Transformer, TransformerWithScalarHead

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def architecture(cfg: TransformerConfig) -> str:
    if not cfg.is_moe:
        return "llama"
    return "qwen2_moe" if cfg.n_shared_experts else "mixtral"


_CLASS_PREFIX = {"llama": "Llama", "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe"}


def hf_config(cfg: TransformerConfig, scalar_head: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    arch = architecture(cfg)
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
        "rope_scaling": None,
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
    if arch == "mixtral":
        out.update(
            intermediate_size=cfg.moe_ffn_dim,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.load_balance_coef,
            sliding_window=None,
        )
    elif arch == "qwen2_moe":
        out.update(
            moe_intermediate_size=cfg.moe_ffn_dim,
            shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_ffn_dim,
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            norm_topk_prob=cfg.router_norm_topk,
            router_aux_loss_coef=cfg.load_balance_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            sliding_window=None,
            qkv_bias=True,  # Qwen2 attention carries q/k/v biases; raylm exports zeros (exact)
        )
    if scalar_head:
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    out["raylm"] = {"capacity_factor": cfg.capacity_factor, "router_z_coef": cfg.router_z_coef}
    return out


def config_from_hf(hf: dict) -> TransformerConfig:
    arch = hf.get("model_type")
    if arch not in _CLASS_PREFIX:
        raise ValueError(f"config.json: model_type {arch!r} is not one raylm loads ({', '.join(_CLASS_PREFIX)})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json: attention_bias / mlp_bias checkpoints are not supported by raylm's model")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id", 2)
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError("config.json: head_dim other than hidden_size / num_attention_heads is not supported")
    extra = hf.get("raylm", {})
    if arch == "mixtral":
        kwargs.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], moe_ffn_dim=hf["intermediate_size"])
    elif arch == "qwen2_moe":
        n_shared = hf["shared_expert_intermediate_size"] // hf["moe_intermediate_size"]
        kwargs.update(
            n_experts=hf["num_experts"],
            top_k=hf["num_experts_per_tok"],
            moe_ffn_dim=hf["moe_intermediate_size"],
            n_shared_experts=n_shared,
            router_norm_topk=bool(hf.get("norm_topk_prob", False)),
        )
        if n_shared * hf["moe_intermediate_size"] != hf["shared_expert_intermediate_size"]:
            raise ValueError("config.json: shared_expert_intermediate_size must be a multiple of moe_intermediate_size")
    if arch != "llama":
        kwargs.update(load_balance_coef=hf.get("router_aux_loss_coef", 0.01))
        kwargs.update({k: extra[k] for k in ("capacity_factor", "router_z_coef") if k in extra})
    return TransformerConfig(**kwargs)


def to_hf_state_dict(cfg: TransformerConfig, state: dict[str, torch.Tensor], scalar_head: bool = False) -> dict:
    """raylm names and fused layouts -> Hugging Face names and per-projection tensors."""
    arch = architecture(cfg)
    hd, nq, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
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
            moe = "block_sparse_moe." if arch == "mixtral" else "mlp."
            if rest == "attention_norm.weight":
                put(layer + "input_layernorm.weight", t)
            elif rest == "ffn_norm.weight":
                put(layer + "post_attention_layernorm.weight", t)
            elif rest == "attention.wqkv.weight":
                q, k, v = t.split([nq * hd, nkv * hd, nkv * hd])
                for proj, w in zip("qkv", (q, k, v)):
                    put(layer + f"self_attn.{proj}_proj.weight", w)
                if arch == "qwen2_moe":  # Qwen2 attention has q/k/v biases: zero ones are exact
                    for proj, n in zip("qkv", (nq, nkv, nkv)):
                        put(layer + f"self_attn.{proj}_proj.bias", t.new_zeros(n * hd))
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
                    if arch == "mixtral":
                        put(layer + moe + f"experts.{e}.w1.weight", gate)
                        put(layer + moe + f"experts.{e}.w3.weight", up)
                    else:
                        put(layer + moe + f"experts.{e}.gate_proj.weight", gate)
                        put(layer + moe + f"experts.{e}.up_proj.weight", up)
            elif rest == "feed_forward.experts.w2":
                for e in range(t.shape[0]):
                    down = "w2" if arch == "mixtral" else "down_proj"
                    put(layer + moe + f"experts.{e}.{down}.weight", t[e].t())
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
    moe = "block_sparse_moe." if arch == "mixtral" else "mlp."
    gate_name, up_name, down_name = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
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
        out[dst + "attention_norm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = take(src + "post_attention_layernorm.weight")
        qkv = [take(src + f"self_attn.{p}_proj.weight") for p in "qkv"]
        for p in "qkv":
            bias = hf.get(src + f"self_attn.{p}_proj.bias")
            if bias is not None and bool(bias.any()):
                raise ValueError(f"{src}self_attn.{p}_proj.bias is non-zero: raylm's attention has no biases")
        out[dst + "attention.wqkv.weight"] = torch.cat(qkv)
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
    (path / "config.json").write_text(json.dumps(hf_config(model.config, scalar_head, save_dtype), indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
                    "pad_token_id": model.config.pad_token_id}, indent=2)
    )
    if tokenizer_file is not None:
        write_tokenizer_files(Path(tokenizer_file), path, model.config)
    return path


def write_tokenizer_files(tokenizer_json: Path, folder: Path, cfg: TransformerConfig) -> None:
    """tokenizer.json plus the tokenizer_config.json that AutoTokenizer and vLLM read."""
    if tokenizer_json.resolve() != (folder / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    vocab = json.loads(tokenizer_json.read_text())
    id_to_token = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
               "clean_up_tokenization_spaces": False}
    for key, token_id in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id), ("pad_token", cfg.pad_token_id)):
        if token_id in id_to_token:
            tok_cfg[key] = id_to_token[token_id]
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
