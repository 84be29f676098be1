"""Weight-only quantization of a frozen raylm ``Transformer``: int8 (per output row) and 4-bit NF4
(QLoRA's NormalFloat levels, one absmax scale per block of 64 weights, two codes per byte).

NF4 with double quantization (QLoRA's section 3) also quantizes the scales: their mean is
subtracted and the rest stored as int8 with one float32 absmax per 256 scales, so a scale costs
8 + 32 / 256 bits instead of 32 (0.127 instead of 0.5 bits per weight at blocks of 64). QLoRA uses
8-bit floats for these; a linear int8 grid is used here (the centred scales are spread evenly).

The projections inside the blocks become ``QuantizedLinear`` modules that keep only the codes and
scales and dequantize on the fly, in forward and again in backward (so no full-precision copy of the
weight is held between the two). Embeddings, norms and the output head stay in full precision, as in
QLoRA. Used for QLoRA fine-tuning (``raylm.peft.lora`` wraps these modules) and for inference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raylm.peft.config import NF4_BLOCK

QuantKind = Literal["int8", "nf4"]


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 values: quantiles of N(0, 1) scaled to [-1, 1], 8 on the positive side
    and 7 on the negative, with an exact zero (Dettmers et al., 2023, section 3)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    edge = 0.9677083  # the outer quantile probability: keeps the extreme levels finite
    positive = normal.icdf(torch.linspace(edge, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(edge, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


_NF4 = nf4_levels()
# Every byte's two levels (high nibble first): one lookup per byte instead of unpacking nibbles.
_NF4_PAIRS = torch.stack([_NF4.repeat_interleave(16), _NF4.repeat(16)], dim=1)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes: uint8 [numel / 2], two 4-bit codes per byte; scales: float32 [numel / block_size])."""
    if weight.numel() % block_size or block_size % 2:
        raise ValueError(f"nf4: {weight.numel()} weights do not split into blocks of {block_size}")
    blocks = weight.detach().float().reshape(-1, block_size)
    scales = blocks.abs().amax(dim=1).clamp(min=1e-12)
    normalized = (blocks / scales[:, None]).flatten()
    levels = _NF4.to(weight.device)
    # nearest level: bucketize against the midpoints between neighbouring levels
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], scales


SCALE_BLOCK = 256  # first-level scales per second-level (float32) scale, as in QLoRA


def quantize_scales(scales: torch.Tensor, block_size: int = SCALE_BLOCK) -> dict[str, torch.Tensor]:
    """Double quantization of NF4's float32 scales -> ``{"scale_codes": int8 [n], "scale_absmax":
    float32 [ceil(n / block_size)], "scale_offset": float32 []}``: the scales minus their mean, in
    blocks of ``block_size`` with one absmax each."""
    offset = scales.float().mean()
    centred = scales.float() - offset
    pad = -len(centred) % block_size
    blocks = F.pad(centred, (0, pad)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    codes = torch.round(blocks / absmax[:, None] * 127).to(torch.int8).flatten()[:len(scales)]
    return {"scale_codes": codes, "scale_absmax": absmax, "scale_offset": offset}


def dequantize_scales(scale_codes: torch.Tensor, scale_absmax: torch.Tensor, scale_offset: torch.Tensor,
                      block_size: int = SCALE_BLOCK) -> torch.Tensor:
    n = scale_codes.numel()
    padded = F.pad(scale_codes.float(), (0, -n % block_size)).reshape(-1, block_size)
    return (padded * (scale_absmax[:, None] / 127)).flatten()[:n] + scale_offset


def scales_of(state: dict, prefix: str) -> torch.Tensor:
    """The first-level scales of the quantized projection ``prefix`` in a state dict, plain or
    double-quantized."""
    if prefix + ".scales" in state:
        return state[prefix + ".scales"]
    return dequantize_scales(state[prefix + ".scale_codes"], state[prefix + ".scale_absmax"],
                             state[prefix + ".scale_offset"])


def dequantize_nf4(codes: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    values = _NF4_PAIRS.to(codes.device)[codes.int()].reshape(scales.shape[0], -1) * scales[:, None]
    return values.reshape(shape).to(dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row absmax: -> (codes: int8 [out, in], scales: float32 [out])."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, shape=None, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scales[:, None]).to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Either format, told apart by the codes' dtype (int8: int8, NF4: packed uint8)."""
    if codes.dtype == torch.int8:
        return dequantize_int8(codes, scales, shape, dtype)
    return dequantize_nf4(codes, scales, shape, dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T with W rebuilt from its codes in forward and again in backward: the gradient reaches
    x (and whatever LoRA sits beside it), never the frozen codes."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.module.dequantized(grad_out.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen, bias-free ``nn.Linear`` stored as int8 or NF4 codes plus float32 scales (NF4 with
    ``double_quant``: the scales themselves as int8 codes, see ``quantize_scales``)."""

    def __init__(self, linear: nn.Linear, kind: QuantKind, block_size: int = NF4_BLOCK, double_quant: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantizedLinear: raylm's projections have no bias")
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        if kind == "nf4":
            codes, scales = quantize_nf4(linear.weight, block_size)
        elif kind == "int8":
            codes, scales = quantize_int8(linear.weight)
        else:
            raise ValueError(f"unknown quantization {kind!r} (int8, nf4)")
        if double_quant and kind != "nf4":
            raise ValueError("double_quant: only NF4's per-block scales are quantized again")
        self.register_buffer("codes", codes)
        if double_quant:
            for name, tensor in quantize_scales(scales).items():
                self.register_buffer(name, tensor)
        else:
            self.register_buffer("scales", scales)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        scales = self.scales if hasattr(self, "scales") else dequantize_scales(
            self.scale_codes, self.scale_absmax, self.scale_offset)
        return dequantize(self.codes, scales, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _DequantizedMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


PROJECTIONS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def quantize_model(model: nn.Module, kind: QuantKind, block_size: int = NF4_BLOCK,
                   double_quant: bool = False) -> nn.Module:
    """Replace, in place, every block's attention and dense-MLP projection by a ``QuantizedLinear``
    and freeze the whole model (a quantized base is never trained; LoRA goes on top)."""
    model.requires_grad_(False)
    for block in model.layers.values():
        for path in PROJECTIONS:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, name, None)
            if isinstance(linear, nn.Linear):
                setattr(parent, name, QuantizedLinear(linear, kind, block_size, double_quant))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (tied weights counted once)."""
    seen, total = set(), 0
    buffers = [b for name, b in model.named_buffers() if not name.startswith("rope_")]  # RoPE tables: rebuilt
    for tensor in list(model.parameters()) + buffers:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
