"""LoRA applied to a raylm ``Transformer`` from outside, saved in PEFT's format, merged for export.

raylm fuses q/k/v into one ``wqkv`` and gate/up into one ``w13``; PEFT (and vLLM) know the Hugging
Face projections ``q_proj`` ... ``down_proj``. So each fused projection gets one independent
(A, B) pair per Hugging Face projection it holds: the low-rank update of ``wqkv`` is the row-wise
concatenation [B_q A_q; B_k A_k; B_v A_v]. That is exactly what PEFT computes on a Llama model,
the pairs map one-to-one onto PEFT's tensors, and any subset of projections can be targeted.
RoPE uses the same half-rotation layout in raylm and Hugging Face, so no row is permuted.

    apply_lora(model, LoRASettings(rank=8, alpha=16))   # wraps the targeted projections, freezes the rest
    save_adapter(model, "out/adapter", base="out/sft/hf")  # adapter_config.json + adapter_model.safetensors
    merged = merge_lora(model)                         # a plain Transformer with W + (alpha/r) B A folded in

The base under LoRA may be a full-precision ``nn.Linear`` or a ``raylm.peft.quantize.QuantizedLinear``
(QLoRA). Only the A and B matrices require gradients.

The stages' ``peft:`` section goes through here for every method: ``apply_peft`` (LoRA, or
``raylm.peft.bottleneck_adapter`` / ``raylm.peft.prompt_tuning``), ``export_peft`` (the trained weights to
``hf/adapter``, plus the merged state where the method merges) and ``load_peft`` (any of those
folders back onto its base).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raylm.models.config import TransformerConfig
from raylm.models.transformer import Transformer
from raylm.peft.config import ALL_PROJECTIONS, PeftConfig
from raylm.peft.quantize import QuantizedLinear, dequantize, quantize_model, scales_of

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
QUANT_SCALE_KEYS = (".scales", ".scale_codes", ".scale_absmax", ".scale_offset")  # QuantizedLinear's buffers


@dataclass
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def fused_projections(cfg: TransformerConfig) -> dict[str, list[tuple[str, int]]]:
    """raylm projection (inside a block) -> its Hugging Face projections and their output rows."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"attention.wqkv": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], "attention.wo": [("o_proj", cfg.dim)]}
    if not cfg.is_moe:  # experts are 3-D parameters, not Linear layers: attention only on MoE models
        out.update({"feed_forward.w13": [("gate_proj", cfg.ffn_dim), ("up_proj", cfg.ffn_dim)],
                    "feed_forward.w2": [("down_proj", cfg.dim)]})
    return out


def hf_module(layer: str, projection: str) -> str:
    """Where PEFT finds a projection in LlamaForCausalLM (under ``base_model.model.``)."""
    kind = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{kind}.{projection}"


class LoRALinear(nn.Module):
    """``base(x) + scaling * concat_p(B_p A_p dropout(x))`` over the targeted row blocks p of a
    (possibly fused, possibly quantized) frozen projection; untargeted blocks get no update."""

    def __init__(self, base: nn.Module, splits: list[tuple[str, int]], settings: LoRASettings,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.splits = splits
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        device = base.codes.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, rows in splits:
            if name not in settings.target_modules:
                continue
            a = torch.empty(settings.rank, base.in_features, device=device)
            # A as nn.Linear initialises its weight (Kaiming-uniform), B zero: the update starts at 0
            bound = 1 / math.sqrt(base.in_features)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, settings.rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        pieces = []
        for name, rows in self.splits:
            if name in self.lora_A:
                pieces.append(F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]))
            else:
                pieces.append(out.new_zeros(*out.shape[:-1], rows))
        return out + torch.cat(pieces, dim=-1).to(out.dtype) * self.scaling


def apply_lora(model: Transformer, settings: LoRASettings, seed: int = 0) -> Transformer:
    """Freeze ``model`` and wrap its targeted projections in place. The A matrices come from a
    generator seeded with ``seed``, so every rank of a data-parallel group starts identical."""
    unknown = set(settings.target_modules) - set(ALL_PROJECTIONS)
    if unknown:
        raise ValueError(f"target_modules: unknown projections {sorted(unknown)}; known: {', '.join(ALL_PROJECTIONS)}")
    projections = fused_projections(model.config)
    available = {name for splits in projections.values() for name, _ in splits}
    if not set(settings.target_modules) & available:
        raise ValueError(f"target_modules: {settings.target_modules} are not in this model ({sorted(available)})")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers.values():
        for path, splits in projections.items():
            if not {name for name, _ in splits} & set(settings.target_modules):
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), splits, settings, generator))
    model.lora_settings = settings
    return model


def settings_of(config: PeftConfig) -> LoRASettings:
    return LoRASettings(config.rank, config.alpha, config.dropout, list(config.target_modules))


def apply_peft(model: Transformer, config: PeftConfig, seed: int = 0) -> Transformer:
    """A ``peft:`` config section applied in place: LoRA (on a quantized base if asked), bottleneck
    adapters or a soft prompt; every method freezes the base, so only its own weights train."""
    if config.quantize != "none" and config.method != "lora":
        raise ValueError("peft.quantize needs peft.method: lora (a quantized base cannot be trained)")
    if config.method == "none":
        return model
    if config.method == "bottleneck":
        from raylm.peft.bottleneck_adapter import apply_bottleneck_adapters

        return apply_bottleneck_adapters(model, config.bottleneck, tuple(config.adapter_where), seed)
    if config.method == "prompt_tuning":
        from raylm.peft.prompt_tuning import apply_prompt_tuning

        return apply_prompt_tuning(model, config.num_virtual_tokens, seed)
    if config.quantize != "none":
        quantize_model(model, config.quantize, config.block_size, config.double_quant)
    return apply_lora(model, settings_of(config), seed)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """-> (trainable, total); quantized weights count as their number of weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, total


# ---- merging ---------------------------------------------------------------------------------

def merged_state_dict(state: dict[str, torch.Tensor], cfg: TransformerConfig, settings: LoRASettings) -> dict:
    """A LoRA model's state dict (LoRALinear / QuantizedLinear keys) -> a plain ``Transformer``'s,
    each base weight (dequantized if need be) plus its update. Works on the gathered full state of
    a sharded model as well as on ``model.state_dict()``."""
    projections = fused_projections(cfg)
    out = {}
    for key, tensor in state.items():
        if ".lora_A." in key or ".lora_B." in key or key.endswith(QUANT_SCALE_KEYS):
            continue
        if key.endswith(".codes"):  # a quantized base: dequantize it
            prefix = key.removesuffix(".codes")
            plain = prefix.removesuffix(".base") + ".weight"
            out[plain] = dequantize(tensor, scales_of(state, prefix), _shape(cfg, plain, projections))
        else:
            out[key.replace(".base.weight", ".weight").replace(".base.bias", ".bias")] = tensor  # Qwen2: q/k/v biases
    for key in [k for k in state if ".lora_A." in k]:
        module, name = key.split(".lora_A.")
        plain = module + ".weight"
        path = plain.split(".", 2)[2].removesuffix(".weight")  # layers.<i>.<path>.weight
        start = 0
        for split, rows in projections[path]:
            if split == name:
                break
            start += rows
        delta = state[f"{module}.lora_B.{name}"].float() @ state[key].float() * settings.scaling
        weight = out[plain].float().clone()
        weight[start:start + delta.shape[0]] += delta
        out[plain] = weight.to(out[plain].dtype)
    return out


def _shape(cfg: TransformerConfig, plain_key: str, projections) -> tuple[int, int]:
    path = plain_key.split(".", 2)[2].removesuffix(".weight")
    rows = sum(r for _, r in projections[path]) if path in projections else None
    in_features = cfg.n_heads * cfg.head_dim if path == "attention.wo" else (
        cfg.ffn_dim if path == "feed_forward.w2" else cfg.dim)
    return rows, in_features


def merge_lora(model: Transformer) -> Transformer:
    """A new plain ``Transformer`` (fp32) with every LoRA update folded into its base weight."""
    plain = Transformer(model.config).to(model.tok_embeddings.weight.device)
    state = merged_state_dict(model.state_dict(), model.config, model.lora_settings)
    plain.load_state_dict({k: v.float() for k, v in state.items()}, strict=not model.config.tie_embeddings)
    return plain


# ---- PEFT's format ---------------------------------------------------------------------------

def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raylm LoRA state -> PEFT's names: ``base_model.model.<hf module>.lora_{A,B}.weight``."""
    out = {}
    for key, tensor in state.items():
        for which in ("lora_A", "lora_B"):
            if f".{which}." in key:
                module, name = key.split(f".{which}.")
                layer = module.split(".")[1]
                out[f"base_model.model.{hf_module(layer, name)}.{which}.weight"] = tensor.detach().float().cpu().contiguous()
    return out


def adapter_config(settings: LoRASettings, base: str | None, modules: list[str]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
    }


def save_adapter_state(state: dict[str, torch.Tensor], settings: LoRASettings, path, base: str | None = None) -> Path:
    """Write a LoRA state (keys with ``.lora_A.`` / ``.lora_B.``) as a PEFT adapter folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(state)
    if not tensors:
        raise ValueError("save_adapter: the state holds no LoRA weights")
    modules = sorted({k.split(".")[-3] for k in tensors})
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(settings, base, modules), indent=2))
    return path


def save_adapter(model: Transformer, path, base: str | None = None) -> Path:
    """``model``'s LoRA weights as a PEFT adapter folder; ``base``: the checkpoint it applies to."""
    return save_adapter_state(model.state_dict(), model.lora_settings, path, base)


def load_adapter(model: Transformer, path, seed: int = 0) -> Transformer:
    """Apply the LoRA of a PEFT adapter folder (raylm's or PEFT's own) to ``model`` in place."""
    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; raylm loads LORA adapters")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"{path}: {key} adapters are not supported")
    targets = config["target_modules"]
    targets = [t for t in ALL_PROJECTIONS if t in targets or (isinstance(targets, str) and t in targets)]
    settings = LoRASettings(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
    apply_lora(model, settings, seed)
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
        tensors = {k.replace(".default.", "."): handle.get_tensor(k) for k in handle.keys()}
    loaded = set()
    for key, module in lora_modules(model).items():
        layer = key.split(".")[1]
        for which, params in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
            for name, param in params.items():
                source = f"base_model.model.{hf_module(layer, name)}.{which}.weight"
                if source not in tensors:
                    raise KeyError(f"{path}: adapter has no tensor {source!r}")
                with torch.no_grad():
                    param.copy_(tensors[source])
                loaded.add(source)
    extra = set(tensors) - loaded
    if extra:
        raise KeyError(f"{path}: adapter tensors raylm did not place: {sorted(extra)[:4]}")
    return model


# ---- every peft method: export and load ------------------------------------------------------

def export_peft(state: dict[str, torch.Tensor], cfg: TransformerConfig, config: PeftConfig, folder,
                base: str | None) -> dict[str, torch.Tensor] | None:
    """Write the trained weights of a ``peft:`` method (``state``: the gathered full model state)
    into ``folder``; -> the plain ``Transformer`` state to export beside it (LoRA: merged), or None
    where the method cannot be merged into a plain model (bottleneck adapters, a soft prompt)."""
    if config.method == "lora":
        settings = settings_of(config)
        save_adapter_state(state, settings, folder, base)
        return merged_state_dict(state, cfg, settings)
    if config.method == "bottleneck":
        from raylm.peft.bottleneck_adapter import save_adapters_state

        save_adapters_state(state, {"bottleneck": config.bottleneck, "where": list(config.adapter_where)}, folder, base)
        return None
    if config.method == "prompt_tuning":
        from raylm.peft.prompt_tuning import save_prompt_state

        save_prompt_state(state["tok_embeddings.prompt"], cfg, folder, base)
        return None
    raise ValueError(f"export_peft: peft.method {config.method!r} trains no separate weights")


def load_peft(model: Transformer, path) -> Transformer:
    """Apply whatever ``export_peft`` wrote in ``path`` (a LoRA or PROMPT_TUNING adapter in PEFT's
    format, or raylm's bottleneck adapters) to ``model``, the base it was trained on, in place."""
    from raylm.peft.bottleneck_adapter import CONFIG as BOTTLENECK_CONFIG
    from raylm.peft.bottleneck_adapter import load_adapters
    from raylm.peft.prompt_tuning import load_prompt

    path = Path(path)
    if (path / BOTTLENECK_CONFIG).exists():
        return load_adapters(model, path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path}: neither {ADAPTER_CONFIG} nor {BOTTLENECK_CONFIG} (not an adapter folder)")
    kind = json.loads((path / ADAPTER_CONFIG).read_text()).get("peft_type")
    if kind == "PROMPT_TUNING":
        return load_prompt(model, path)
    return load_adapter(model, path)
