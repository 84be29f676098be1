"""Bottleneck adapters (Houlsby et al., 2019) applied to a raylm ``Transformer`` from outside: a
small residual MLP, ``y + up(gelu(down(y)))``, after each block's attention and/or MLP output; the
rest of the model frozen. ``up`` starts at zero, so the adapted model starts as the base model.

Unlike LoRA, the update is not linear in the weights: it cannot be merged into a plain checkpoint,
and PEFT has no such adapter for Llama. Adapters are saved as raylm's own safetensors file beside a
small JSON config and applied again with ``load_adapters`` on the same base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raylm.models.transformer import Transformer

Where = Literal["attention", "mlp"]
CONFIG, WEIGHTS = "bottleneck_adapter_config.json", "bottleneck_adapters.safetensors"


class BottleneckAdapter(nn.Module):
    """Wraps a sub-layer (attention or MLP) whose output is [..., dim]; passes every argument on."""

    def __init__(self, inner: nn.Module, dim: int, bottleneck: int, generator: torch.Generator | None = None):
        super().__init__()
        self.inner = inner
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            bound = 1 / dim**0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        return y + self.up(F.gelu(self.down(y)))

    def __getattr__(self, name):  # MoE bookkeeping (aux_loss, tokens_per_expert) read through the wrapper
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def apply_bottleneck_adapters(model: Transformer, bottleneck: int = 16, where: tuple[Where, ...] = ("attention", "mlp"),
                              seed: int = 0) -> Transformer:
    """Freeze ``model`` and add a trainable adapter after the chosen sub-layers of every block."""
    if not where or set(where) - {"attention", "mlp"}:
        raise ValueError(f"where: {where}; choose from attention, mlp")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    dim = model.config.dim
    for block in model.layers.values():
        if "attention" in where:
            block.attention = BottleneckAdapter(block.attention, dim, bottleneck, generator)
        if "mlp" in where:
            block.feed_forward = BottleneckAdapter(block.feed_forward, dim, bottleneck, generator)
    model.bottleneck_adapter_settings = {"bottleneck": bottleneck, "where": list(where)}
    return model


def save_adapters_state(state: dict[str, torch.Tensor], settings: dict, path, base: str | None = None) -> Path:
    """The adapter weights of a model state (keys with ``.down.`` / ``.up.``) and their settings."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if ".down." in k or ".up." in k}
    if not tensors:
        raise ValueError("save_adapters: the state holds no bottleneck adapter weights")
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps({**settings, "base_model": base}, indent=2))
    return path


def save_adapters(model: Transformer, path, base: str | None = None) -> Path:
    return save_adapters_state(model.state_dict(), model.bottleneck_adapter_settings, path, base)


def load_adapters(model: Transformer, path) -> Transformer:
    path = Path(path)
    settings = json.loads((path / CONFIG).read_text())
    apply_bottleneck_adapters(model, settings["bottleneck"], tuple(settings["where"]))
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    adapter_missing = [k for k in missing if ".down." in k or ".up." in k]
    if adapter_missing or unexpected:
        raise KeyError(f"{path}: adapters missing {adapter_missing[:4]}, unexpected {unexpected[:4]}")
    return model
