"""The architecture of a raylm decoder-only transformer, and its named size presets.

One dataclass describes both families: dense (``n_experts == 0``) and sparse Mixture-of-Experts.
It is plain Python so that ``models/`` stays free of Ray and of any configuration framework;
``__pydantic_config__`` only tells raylm's config loader to refuse unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TransformerConfig:
    vocab_size: int = 8192
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head); fewer: grouped-query
    ffn_dim: int | None = None  # None: about 8/3 * dim, rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    # Mixture-of-Experts; n_experts == 0 is the dense family.
    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0  # a shared MLP of n_shared_experts * moe_ffn_dim, sigmoid-gated
    moe_ffn_dim: int | None = None  # None: same as ffn_dim
    router_norm_topk: bool = True  # renormalise the top-k router probabilities to sum to 1
    capacity_factor: float | None = None  # None: dropless; else tokens over capacity are dropped
    load_balance_coef: float = 0.01
    router_z_coef: float = 0.001
    # Token ids the model is built around (the tokenizer's special tokens).
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * -(-(8 * self.dim // 3) // 64)
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        self.validate()

    def validate(self) -> None:
        """Raises ValueError, its message starting with the field's name, when impossible."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} heads do not divide dim {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"n_heads: head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        if self.n_experts < 0:
            raise ValueError(f"n_experts: must be >= 0, got {self.n_experts}")
        if self.n_experts:
            if not 1 <= self.top_k <= self.n_experts:
                raise ValueError(f"top_k: {self.top_k} is not between 1 and n_experts ({self.n_experts})")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor: must be positive or null, got {self.capacity_factor}")
            if not self.router_norm_topk and not self.n_shared_experts:
                # Mixtral (no shared expert) always renormalises; Qwen2-MoE (shared expert) may not.
                raise ValueError("router_norm_topk: false needs n_shared_experts > 0 (exported as Qwen2-MoE)")
        if self.n_shared_experts < 0 or (self.n_shared_experts and not self.n_experts):
            raise ValueError("n_shared_experts: needs n_experts > 0 and must be >= 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}: {getattr(self, name)} is not below vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named sizes, from a ~1M-parameter debug model to ~1B. Vocabulary 8192 unless overridden;
# parameter counts in the comments include the (tied) embedding at that vocabulary.
PRESETS: dict[str, dict] = {
    "debug": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384),  # ~1.4M
    "tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=704),  # ~5M
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408),  # ~28M
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048),  # ~82M
    "medium": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816),  # ~292M
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=32768, max_seq_len=2048),  # ~1.04B
    "moe-debug": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, moe_ffn_dim=128),  # ~1.5M, 1.3M active
    "moe-tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, n_experts=8, top_k=2, moe_ffn_dim=256),  # ~9.4M, 4.7M active
    "moe-small": dict(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, n_experts=8, top_k=2, n_shared_experts=1, moe_ffn_dim=512
    ),  # ~67M, 29M active
}


def preset(name: str, **overrides) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})
