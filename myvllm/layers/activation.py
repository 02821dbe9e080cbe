"""SiLU-gated activation of the MLP."""

from __future__ import annotations

import torch
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] -> silu(gate) * up [T, I]."""
        return self.ops.silu_and_mul(x)
