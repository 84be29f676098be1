"""A decoder-only transformer in plain PyTorch: dense or sparse Mixture-of-Experts.

Pre-norm RMSNorm blocks, rotary position embeddings (the half-rotation layout Hugging Face Llama
uses, so weights map across without permutation), grouped-query attention through
``scaled_dot_product_attention``, SwiGLU MLPs. The query/key/value and gate/up projections are
each one fused matmul; the Hugging Face adapter splits them on export.

No distributed code lives here: data, tensor, pipeline, context and expert parallelism are applied
to these modules from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .feed_forward import FeedForward
from .moe import MoE


def rope_inv_freq(cfg: TransformerConfig) -> tuple[torch.Tensor, float]:
    """The rotation frequency of each pair of head dimensions, with the config's RoPE scaling, and
    the factor cos and sin are multiplied by (yarn's attention scaling; 1 otherwise). The formulas
    are the ones Hugging Face's rope_scaling types define, so checkpoints trained with them load exact."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, attention_factor = cfg.rope_factor, 1.0
    # "dynamic" (NTK) raises the base only for calls longer than max_seq_len (transformers' original
    # context, max_position_embeddings), which raylm never runs: up to it, the frequencies are these.
    if cfg.rope_type == "linear":  # positions divided by factor
        inv_freq = inv_freq / factor
    elif cfg.rope_type == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are stretched by factor,
        # shorter than / high_freq_factor kept; the band between is interpolated smoothly.
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor,
                               torch.where(wavelen < original / high, inv_freq, scaled))
    elif cfg.rope_type == "yarn":
        # NTK-by-parts: dimensions that rotate fewer than beta_slow times over the original context
        # are interpolated, more than beta_fast times extrapolated, a linear ramp between.
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no division by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        attention_factor = cfg.rope_attention_factor
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def rope_tables(cfg: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, attention_factor = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    if attention_factor == 1.0:
        return angles.cos().float(), angles.sin().float()
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [T, D] or [B, 1, T, D], each half of D the same angles.

    ``x * cos + rotate_half(x) * sin``, as transformers' Llama writes it, with rotate_half(x) =
    (-x2, x1) for the halves x1, x2 of x. Here the second term is added into each half of the first
    in place, with no rotated copy of x: the same products and sums (up to rounding), in three passes over x where the
    ``cat``/``neg`` form takes five, which made it a tenth of a small model's forward on CPU."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class KVCache:
    """Keys and values of every layer for a batch of sequences, in preallocated slots."""

    def __init__(self, cfg: TransformerConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # slots filled so far (the same for every sequence: left padding)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def scaled_dot_product_attention(q, k, v, attn_mask=None):
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D]; causal when no mask is given."""
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Normalised queries and keys keep attention logits bounded: per head (Qwen3) or over the
        # whole projection (OLMo2).
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            q_size, k_size = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (
                cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
            self.q_norm = nn.RMSNorm(q_size, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(k_size, eps=cfg.norm_eps)
        # The attention kernel. Parallelisms that split the sequence swap in their own from outside
        # (raylm.distributed.context_parallel); the model itself holds no distributed code.
        self.sdpa = scaled_dot_product_attention

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, layer: int = 0):
        batch, seq, _ = x.shape
        qkv = self.wqkv(x)
        # Head counts are read off the projection's width so that tensor parallelism can shard them.
        heads = qkv.shape[-1] // self.head_dim
        n_kv = heads * self.n_kv_heads // (self.n_heads + 2 * self.n_kv_heads)
        n_q = heads - 2 * n_kv
        if self.qk_norm == "full":
            q, k, v = qkv.split([n_q * self.head_dim, n_kv * self.head_dim, n_kv * self.head_dim], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        qkv = qkv.view(batch, seq, heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q = apply_rope(self.q_norm(qkv[:, :n_q]), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, n_q : n_q + n_kv]), cos, sin)
        else:
            q, k = apply_rope(qkv[:, : n_q + n_kv], cos, sin).split([n_q, n_kv], dim=1)  # both in one pass
        v = qkv[:, n_q + n_kv :]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = self.sdpa(q, k, v, attn_mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)
        # "post" (OLMo2) normalises each sublayer's output instead of its input, with the same two norms.
        self.post_norm = cfg.norm_placement == "post"

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, output_rows=None):
        if self.post_norm:
            x = x + self.attention_norm(self.attention(x, cos, sin, attn_mask, cache, layer))
        else:
            x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer)
        if output_rows is not None:  # only these positions' outputs are wanted: [1, rows, dim] from here
            x = x.flatten(0, 1)[output_rows][None]
        if self.post_norm:
            return x + self.ffn_norm(self.feed_forward(x))
        return x + self.feed_forward(self.ffn_norm(x))


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids of packed sequences -> [B, 1, T, T] boolean mask: causal, and no
    attention across document boundaries."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at the first token of every packed document."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class Transformer(nn.Module):
    """The backbone plus (optionally) the language-model head.

    ``forward`` returns logits ``[B, T, vocab]``; ``hidden_states`` returns the final-norm
    features that the reward and value heads read. MoE layers leave their auxiliary loss and
    per-expert token counts on themselves after each forward (see ``moe_aux_loss``).
    """

    def __init__(self, cfg: TransformerConfig, with_lm_head: bool = True):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict, not a list, so that pipeline stages can delete layers and keep the others' names.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if with_lm_head else None
        if self.output is not None and cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, output projections scaled by depth, unit norms."""
        std = self.config.initializer_range
        depth_std = std / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                generator = None
                if seed is not None:
                    generator = torch.Generator(device=param.device).manual_seed(seed)
                    seed += 1
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                    nn.init.normal_(param, 0.0, depth_std, generator=generator)
                else:
                    nn.init.normal_(param, 0.0, std, generator=generator)
        # The RoPE tables are not in the state dict: rebuild them (a meta-device build left none).
        cos, sin = rope_tables(self.config)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def rope_for(self, positions: torch.Tensor | None, seq: int, offset: int, dtype) -> tuple:
        if positions is None:
            if offset + seq > self.rope_cos.shape[0]:
                raise ValueError(f"{offset + seq} positions: longer than the model's max_seq_len "
                                 f"({self.config.max_seq_len}, config.json's max_position_embeddings)")
            cos, sin = self.rope_cos[offset : offset + seq], self.rope_sin[offset : offset + seq]
        else:  # per-sequence positions [B, T] (packing, left padding)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(self, tokens, positions=None, attn_mask=None, cache: KVCache | None = None,
                      output_rows: torch.Tensor | None = None):
        """Final hidden states [B, T, dim]. With ``output_rows`` (flat indices b * T + t), those
        positions' alone, as [1, len(output_rows), dim]: the last block's feed-forward runs on them
        only, its attention still on every position, as they read every position's key and value.
        Scoring that reads a few positions of long contexts skips most of a block this way."""
        # A pipeline stage past the first has no embeddings: its input is the previous stage's output.
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        offset = cache.length if cache is not None and positions is None else 0
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        cos, sin = self.rope_for(positions, tokens.shape[1], offset, dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, attn_mask, cache, i, output_rows if i == last else None)
        if cache is not None:
            cache.length += tokens.shape[1]
        return h if self.norm is None else self.norm(h)

    def forward(self, tokens, positions=None, attn_mask=None, cache: KVCache | None = None):
        h = self.hidden_states(tokens, positions, attn_mask, cache)
        return h if self.output is None else self.output(h)  # a pipeline stage before the last: no head

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def moe_aux_loss(self) -> torch.Tensor | float:
        """Weighted load-balancing plus router z-loss of the last forward, summed over layers."""
        return sum((m.aux_loss for m in self.moe_layers()), 0.0)

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; ``active`` counts only top_k of the routed experts per token."""
        cfg = self.config
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active and cfg.is_moe and ".experts." in f".{name}":
                n = n * cfg.top_k // cfg.n_experts
            if not embeddings and name == "tok_embeddings.weight":
                continue
            total += n
        return total


def flops_per_token(cfg: TransformerConfig, seq_len: int, with_lm_head: bool = True) -> float:
    """Training FLOPs (forward + backward) per token: 6 per active matmul weight plus attention's
    QK^T and AV products (12 * layers * heads * head_dim * seq_len, the PaLM convention)."""
    attn_proj = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    if cfg.is_moe:
        ffn = 3 * cfg.dim * cfg.moe_ffn_dim * cfg.top_k + cfg.dim * cfg.n_experts
        ffn += 3 * cfg.dim * cfg.moe_ffn_dim * cfg.n_shared_experts + (cfg.dim if cfg.n_shared_experts else 0)
    else:
        ffn = 3 * cfg.dim * cfg.ffn_dim
    matmul_weights = cfg.n_layers * (attn_proj + ffn) + (cfg.dim * cfg.vocab_size if with_lm_head else 0)
    return 6.0 * matmul_weights + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class TransformerWithScalarHead(nn.Module):
    """The backbone with one scalar per token: a reward model reads the last real token's score,
    a value model (the PPO critic) every token's."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg, with_lm_head=False)
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, tokens, positions=None, attn_mask=None) -> torch.Tensor:
        """[B, T] -> per-token scores [B, T] (float32)."""
        return self.score(self.model.hidden_states(tokens, positions, attn_mask)).squeeze(-1).float()

    def sequence_scores(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores at the last non-padding token of each right-padded sequence: [B]."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        scores = self(tokens, positions=positions)
        last = attention_mask.long().sum(-1) - 1
        return scores[torch.arange(tokens.shape[0], device=tokens.device), last]


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() is called on: cross-entropy plus MoE auxiliary loss
    ce_loss: torch.Tensor
    aux_loss: torch.Tensor | float
    n_tokens: int


def causal_lm_loss(model: Transformer, tokens, labels, positions=None, attn_mask=None, ignore_index=-100):
    """Next-token cross-entropy (labels already shifted; ``ignore_index`` masks prompt and padding)."""
    logits = model(tokens, positions, attn_mask)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)
    aux = model.moe_aux_loss() if model.config.is_moe else 0.0
    return LossOutput(ce + aux, ce, aux, int((labels != ignore_index).sum()))
