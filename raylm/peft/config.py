"""The ``peft:`` config section (parameter-efficient fine-tuning) of `raylm sft`, `dpo` and `rlhf`, kept
free of torch so that stage configs load and validate without importing it; ``raylm.peft.lora.apply_peft``
applies it. Methods:

- ``lora``: low-rank updates of the chosen projections (``rank``, ``alpha``, ``dropout``,
  ``target_modules``), optionally on an int8 / NF4-quantized base (``quantize``: QLoRA);
- ``bottleneck``: a residual MLP of width ``bottleneck`` after each block's attention and/or MLP
  (``adapter_where``), Houlsby-style;
- ``prompt_tuning``: ``num_virtual_tokens`` learned input embeddings before every sequence.

Every method freezes the whole base. Freezing by depth (train only some blocks) is the stages'
``freeze:`` section, with ``peft.method: none``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.config import Section

HFProjection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64

# The keys that only mean something for one method: setting one for another method is an error.
METHOD_KEYS = {
    "lora": ("rank", "alpha", "dropout", "target_modules", "quantize", "block_size", "double_quant"),
    "bottleneck": ("bottleneck", "adapter_where"),
    "prompt_tuning": ("num_virtual_tokens",),
}


class PeftConfig(Section):
    """The ``peft:`` section of `raylm sft` and `raylm dpo`."""

    method: Literal["none", "lora", "bottleneck", "prompt_tuning"] = "none"  # none: full fine-tuning (or freeze:)
    # lora
    rank: int = Field(default=8, ge=1)  # rank of LoRA's low-rank update
    alpha: float = Field(default=16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0, lt=1)  # on LoRA's input only
    # the projections (Hugging Face names) that get a LoRA update; default all seven
    target_modules: list[HFProjection] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)
    quantize: Literal["none", "int8", "nf4"] = "none"  # of the frozen base (QLoRA with nf4); needs method: lora
    block_size: int = Field(default=NF4_BLOCK, ge=2)  # weights per NF4 scale
    double_quant: bool = False  # NF4's scales quantized again to 8 bits (QLoRA's double quantization)
    # bottleneck
    bottleneck: int = Field(default=16, ge=1)  # the adapter's hidden width
    # where a bottleneck adapter follows: each block's attention, its MLP, or both
    adapter_where: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    # prompt_tuning
    num_virtual_tokens: int = Field(default=8, ge=1)  # learned input embeddings put before every sequence

    @model_validator(mode="after")
    def _keys_of_the_method(self):
        for method, keys in METHOD_KEYS.items():
            # A default spelled out is harmless (a dumped config has every key); quantize without
            # lora has its own message in the stages' checks.
            stray = [k for k in keys if method != self.method and k != "quantize" and k in self.model_fields_set
                     and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
            if stray:
                raise ValueError(f"{stray[0]}: applies to method {method}, but peft.method is {self.method}")
        return self
