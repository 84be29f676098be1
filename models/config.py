"""The architecture of a raylm decoder-only transformer, and its named size presets.

One dataclass describes both families: dense (``n_experts == 0``) and sparse Mixture-of-Experts.
It is plain Python so that ``models/`` stays free of Ray and of any configuration framework;
``__pydantic_config__`` only tells raylm's config loader to refuse unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# The block each Hugging Face family (model_type) has, in the knobs below: what a config exported
# as that family must hold. attention_bias None: the family has q/k/v biases, zero ones are exact.
FAMILY_BLOCKS: dict[str, dict] = {
    "llama": dict(moe=False, attention_bias=False, qk_norm=None, norm_placement="pre"),
    "mistral": dict(moe=False, attention_bias=False, qk_norm=None, norm_placement="pre"),
    "qwen2": dict(moe=False, attention_bias=None, qk_norm=None, norm_placement="pre"),
    "qwen3": dict(moe=False, attention_bias=False, qk_norm="head", norm_placement="pre"),
    "olmo2": dict(moe=False, attention_bias=False, qk_norm="full", norm_placement="post"),
    "mixtral": dict(moe=True, attention_bias=False, qk_norm=None, norm_placement="pre"),
    "qwen2_moe": dict(moe=True, attention_bias=None, qk_norm=None, norm_placement="pre"),
    "qwen3_moe": dict(moe=True, attention_bias=False, qk_norm="head", norm_placement="pre"),
}


@dataclass
class TransformerConfig:
    vocab_size: int = 8192  # rows of the token embedding and the output head
    dim: int = 128  # width of the residual stream (model dimension)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head); fewer: grouped-query
    head_dim: int | None = None  # None: dim // n_heads; Qwen3 and others set it on its own
    ffn_dim: int | None = None  # None: about 8/3 * dim, rounded up to a multiple of 64
    max_seq_len: int = 512  # longest sequence, in tokens; RoPE tables are built for this many positions
    rope_theta: float = 10000.0  # RoPE base: frequencies are rope_theta ** (-2i / head_dim)
    norm_eps: float = 1e-5  # epsilon of every RMSNorm
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    # std of the normal initialisation (output projections: divided by sqrt(2 * n_layers))
    initializer_range: float = 0.02
    # Block variants of the Hugging Face families raylm loads; the defaults are raylm's own (Llama) block.
    attention_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    qk_norm: str | None = None  # RMSNorm of queries and keys before RoPE: "head" (each head: Qwen3), "full" (OLMo2)
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "post": x + norm(f(x)) (OLMo2)
    # RoPE frequency scaling for contexts longer than training's (Hugging Face's rope_scaling).
    rope_type: str = "default"  # "default", "linear", "dynamic" (NTK: as default up to max_seq_len), "llama3" or "yarn"
    rope_factor: float = 1.0  # context scaling factor of linear, dynamic, llama3 and yarn (unused with "default")
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths over original context / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original context / this are kept
    rope_original_max_seq_len: int | None = None  # llama3 and yarn: the context before scaling
    rope_beta_fast: float = 32.0  # yarn: dimensions rotating more times than this over the original context are kept
    rope_beta_slow: float = 1.0  # yarn: dimensions rotating fewer times than this are divided by rope_factor
    rope_attention_factor: float | None = None  # yarn; None: 0.1 * ln(factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    # The Hugging Face model_type written on export (and read on load); None: raylm's choice
    # (llama, or mixtral / qwen2_moe for MoE). A checkpoint brought in is exported in its own family.
    hf_model_type: str | None = None
    # config.json fields of a brought-in checkpoint that do not change the numerics (e.g. Llama 3's
    # list of end-of-turn ids), written back as they came on export.
    hf_metadata: dict | None = None
    # Mixture-of-Experts; n_experts == 0 is the dense family.
    n_experts: int = 0  # routed experts per MoE layer; 0: dense MLP
    top_k: int = 2  # experts each token is routed to
    n_shared_experts: int = 0  # a shared MLP of n_shared_experts * moe_ffn_dim, sigmoid-gated
    moe_ffn_dim: int | None = None  # None: same as ffn_dim
    router_norm_topk: bool = True  # renormalise the top-k router probabilities to sum to 1
    capacity_factor: float | None = None  # None: dropless; else tokens over capacity are dropped
    load_balance_coef: float = 0.01  # weight of the load-balancing auxiliary loss in the training loss
    router_z_coef: float = 0.001  # weight of the router z-loss (squared log-sum-exp of the router logits)
    # Token ids the model is built around (the tokenizer's special tokens).
    bos_token_id: int = 1  # begin-of-sequence token id
    eos_token_id: int = 2  # end-of-sequence token id; generation stops on it (or on hf_metadata's list)
    pad_token_id: int = 0  # padding token id (left padding and finished rows in generation)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * -(-(8 * self.dim // 3) // 64)
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        self.validate()

    @property
    def end_token_ids(self) -> list[int]:
        """Every id that ends a completion: a brought-in checkpoint may list several (Llama 3's
        end-of-turn and end-of-text), which transformers and vLLM both stop on."""
        ids = (self.hf_metadata or {}).get("eos_token_id")
        return list(ids) if isinstance(ids, list) else [self.eos_token_id]

    def validate(self) -> None:
        """Raises ValueError, its message starting with the field's name, when impossible."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.head_dim <= 0:
            raise ValueError(f"head_dim: must be positive, got {self.head_dim}")
        if self.head_dim * self.n_heads != self.dim and self.head_dim == self.dim // self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} heads do not divide dim {self.dim} (or set head_dim)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: {self.head_dim} must be even for RoPE")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm: {self.qk_norm!r} is not null, 'head' or 'full'")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement: {self.norm_placement!r} is not 'pre' or 'post'")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type: {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and self.rope_factor <= 0:
            raise ValueError(f"rope_factor: must be positive, got {self.rope_factor}")
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError("rope_low_freq_factor: must be below rope_high_freq_factor")
        if self.n_experts < 0:
            raise ValueError(f"n_experts: must be >= 0, got {self.n_experts}")
        if self.n_experts:
            if not 1 <= self.top_k <= self.n_experts:
                raise ValueError(f"top_k: {self.top_k} is not between 1 and n_experts ({self.n_experts})")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor: must be positive or null, got {self.capacity_factor}")
            if not self.router_norm_topk and not self.n_shared_experts and self.hf_model_type != "qwen3_moe":
                # Mixtral (no shared expert) always renormalises; Qwen2-MoE (shared expert) may not.
                raise ValueError("router_norm_topk: false needs n_shared_experts > 0 (exported as Qwen2-MoE)")
        if self.hf_model_type is not None:
            self.check_family()
        if self.n_shared_experts < 0 or (self.n_shared_experts and not self.n_experts):
            raise ValueError("n_shared_experts: needs n_experts > 0 and must be >= 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}: {getattr(self, name)} is not below vocab_size ({self.vocab_size})")

    def check_family(self) -> None:
        """The knobs against the block of ``hf_model_type``, so that an export in it is exact."""
        family = FAMILY_BLOCKS.get(self.hf_model_type)
        if family is None:
            raise ValueError(f"hf_model_type: {self.hf_model_type!r} is not one of {', '.join(FAMILY_BLOCKS)}")
        if family["moe"] != self.is_moe:
            raise ValueError(f"hf_model_type: {self.hf_model_type} is {'an MoE' if family['moe'] else 'a dense'} family: "
                             f"n_experts {self.n_experts} does not fit it")
        for knob in ("attention_bias", "qk_norm", "norm_placement"):
            if family[knob] is not None and getattr(self, knob) != family[knob]:
                raise ValueError(f"{knob}: {self.hf_model_type} needs {family[knob]!r}, got {getattr(self, knob)!r}")
        if self.n_shared_experts and self.hf_model_type != "qwen2_moe":
            raise ValueError(f"n_shared_experts: {self.hf_model_type} has no shared expert (qwen2_moe has)")
        if self.hf_model_type == "mixtral" and not self.router_norm_topk:
            raise ValueError("router_norm_topk: mixtral always renormalises the top-k probabilities")
        if self.hf_model_type == "olmo2" and self.head_dim * self.n_heads != self.dim:
            raise ValueError(f"head_dim: olmo2 needs dim / n_heads ({self.dim // self.n_heads}), got {self.head_dim}")

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
