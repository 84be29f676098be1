"""The SwiGLU feed-forward network of dense blocks and of MoE shared experts."""

import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """w2(silu(x w1) * (x w3)), with w1 and w3 fused into one matmul (``w13``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
