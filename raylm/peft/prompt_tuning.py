"""Prompt tuning applied to a raylm ``Transformer`` from outside: ``n`` learned input embeddings (a
soft prompt) before every sequence, everything else frozen; saved in PEFT's PROMPT_TUNING format.

The model stays a ``Transformer`` (so FSDP2 and the checkpoint code see the usual module tree):
its embedding is wrapped so that ``n`` placeholder positions read the soft prompt, and two hooks on
the model prepend those positions and cut them from the logits. Packed sequences keep their meaning:
every document attends to the soft prompt (at positions 0..n-1) and restarts its own positions at n,
as if each example had been given the prompt alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raylm.models.transformer import Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class PromptedEmbedding(nn.Module):
    """The token embedding, with the first ``n`` positions of every sequence replaced by the prompt."""

    def __init__(self, embedding: nn.Embedding, n_virtual: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = embedding.requires_grad_(False)
        # start from the embeddings of random vocabulary entries: on the scale the blocks expect
        rows = torch.randint(0, embedding.num_embeddings, (n_virtual,), generator=generator)
        self.prompt = nn.Parameter(embedding.weight.detach()[rows.to(embedding.weight.device)].clone())

    @property
    def weight(self) -> torch.Tensor:  # a tied output head reads the embedding matrix through here
        return self.base.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.prompt.shape[0]
        real = self.base(tokens[:, n:])
        return torch.cat([self.prompt.to(real.dtype).expand(tokens.shape[0], -1, -1), real], dim=1)


def _prepend(module: Transformer, args: tuple, kwargs: dict):
    n = module.tok_embeddings.prompt.shape[0]
    names = ("tokens", "positions", "attn_mask", "cache")
    values = dict(zip(names, args)) | kwargs
    if values.get("cache") is not None:
        raise NotImplementedError("prompt tuning: generation with a KV cache is not supported; merge is impossible "
                                  "too (use peft with the saved adapter to serve)")
    tokens = values["tokens"]
    batch = tokens.shape[0]
    values["tokens"] = torch.cat([tokens.new_zeros(batch, n), tokens], dim=1)
    if values.get("positions") is not None:
        virtual = torch.arange(n, device=tokens.device).expand(batch, n)
        values["positions"] = torch.cat([virtual, values["positions"] + n], dim=1)
    mask = values.get("attn_mask")
    if mask is not None:  # boolean [B, 1, T, T]: the real queries see every virtual key, never the reverse
        t = mask.shape[-1]
        full = torch.zeros(mask.shape[0], mask.shape[1], n + t, n + t, dtype=torch.bool, device=mask.device)
        full[..., :n, :n] = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        full[..., n:, :n] = True
        full[..., n:, n:] = mask
        values["attn_mask"] = full
    return (), values


def _strip(module: Transformer, args, kwargs, output: torch.Tensor) -> torch.Tensor:
    return output[:, module.tok_embeddings.prompt.shape[0]:]


def apply_prompt_tuning(model: Transformer, n_virtual: int, seed: int = 0) -> Transformer:
    """Freeze ``model`` and give it a trainable soft prompt of ``n_virtual`` embeddings, in place."""
    if n_virtual < 1:
        raise ValueError("prompt tuning: n_virtual must be at least 1")
    model.requires_grad_(False)
    tied = model.output is not None and model.output.weight is model.tok_embeddings.weight
    model.tok_embeddings = PromptedEmbedding(model.tok_embeddings, n_virtual, torch.Generator().manual_seed(seed))
    if tied:
        model.output.weight = model.tok_embeddings.base.weight
    model.register_forward_pre_hook(_prepend, with_kwargs=True)
    model.register_forward_hook(_strip, with_kwargs=True)
    return model


def save_prompt_state(prompt: torch.Tensor, cfg, path, base: str | None = None) -> Path:
    """A soft prompt [n, dim] as a PEFT PROMPT_TUNING folder for a model of config ``cfg``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prompt = prompt.detach().float().cpu().contiguous()
    save_file({"prompt_embeddings": prompt}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "num_virtual_tokens": prompt.shape[0], "token_dim": cfg.dim, "num_transformer_submodules": 1,
              "num_attention_heads": cfg.n_heads, "num_layers": cfg.n_layers, "prompt_tuning_init": "RANDOM",
              "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def load_prompt(model: Transformer, path) -> Transformer:
    """Apply the soft prompt of a PEFT PROMPT_TUNING folder (raylm's or PEFT's own) to ``model``."""
    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "PROMPT_TUNING" or config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{path}: not a decoder-only PROMPT_TUNING adapter")
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
        prompt = handle.get_tensor("prompt_embeddings")
    apply_prompt_tuning(model, prompt.shape[0])
    with torch.no_grad():
        model.tok_embeddings.prompt.copy_(prompt)
    return model
