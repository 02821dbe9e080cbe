"""RMSNorm, which runs as the prologue of the projection it feeds.

The decoder never normalises on its own: calling an `RMSNorm` on (x, residual) only names the
operands, as a `NormPrologue`, and the projection that takes it (qkv_proj, gate_up_proj, the LM
head) computes norm(x + residual) @ W.T and the new residual stream x + residual together. At
decode sizes that is one CUDA kernel (`FusedOps.add_norm_linear`), and the code of a decoder
layer still reads norm -> attention -> norm -> MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormPrologue:
        """x [T, N] and the residual stream before it (None before the first layer) -> the input of
        a projection that applies this norm to x + residual."""
        return NormPrologue(x, residual, self)


@dataclass(frozen=True)
class NormPrologue:
    """x (+ residual) with `norm` still to apply: what a projection with a norm prologue takes."""

    x: torch.Tensor
    residual: torch.Tensor | None
    norm: RMSNorm

    def project(self, weight: torch.Tensor, ops, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s) @ weight.T, s) with s = x + residual (x alone without a residual); with silu the
        weight is a packed [gate; up] and silu(gate) * up is returned. ops: kernels.fused_ops.FusedOps."""
        if self.residual is None:
            return ops.norm_linear(self.x, self.norm.weight, self.norm.eps, weight, silu), self.x
        return ops.add_norm_linear(self.x, self.residual, self.norm.weight, self.norm.eps, weight, silu)

    def normalize(self, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) with s = x + residual (x alone without a residual), for a consumer that
        runs on its own after the norm (a quantized projection, the MoE router and experts).
        ops: kernels.fused_ops.FusedOps."""
        if self.residual is None:
            return ops.rms_norm(self.x, self.norm.weight, self.norm.eps), self.x
        return ops.fused_add_rms_norm(self.x, self.residual, self.norm.weight, self.norm.eps)
