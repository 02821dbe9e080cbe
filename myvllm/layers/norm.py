"""RMSNorm with an optional fused residual add, alone or fused into the projection it feeds."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops  # kernels.fused_ops.FusedOps: CUDA kernels or torch references
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def project(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, silu: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s) @ weight.T, s) with s = x + residual, or x without one; with silu the
        projection is a packed [gate; up] and silu(gate) * up is returned. For a few tokens
        this is one CUDA kernel; the weight may be any column-parallel projection's."""
        if residual is None:
            return self.ops.norm_linear(x, self.weight, self.eps, weight, silu), x
        return self.ops.add_norm_linear(x, residual, self.weight, self.eps, weight, silu)
