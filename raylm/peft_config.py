"""The ``peft:`` config section (parameter-efficient fine-tuning), kept free of torch so that stage
configs load and validate without importing it; ``raylm.lora`` applies it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylm.config import Section

HFProjection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64


class PeftConfig(Section):
    """The ``peft:`` section of `raylm sft` (and of the post-training stages that adopt it)."""

    method: Literal["none", "lora"] = "none"  # none: full fine-tuning (or freeze: by depth)
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0, lt=1)  # on LoRA's input only
    target_modules: list[HFProjection] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)
    quantize: Literal["none", "int8", "nf4"] = "none"  # of the frozen base (QLoRA with nf4); needs method: lora
    block_size: int = Field(default=NF4_BLOCK, ge=2)  # weights per NF4 scale
