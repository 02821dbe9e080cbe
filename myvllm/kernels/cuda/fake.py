"""Fake (meta) versions of the `torch.ops.myvllm` CUDA ops, for torch.compile.

A compiled forward (runtime/compilation.py) traces through these ops without running them:
each fake returns empty tensors of the shapes, dtype and device the kernel returns (new and
contiguous, as bindings.cpp's schemas promise), so the ops stay opaque nodes of the graph.
`register()` runs once, after the library is loaded (build.load_cuda_ops).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _like(x)


def _fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _like(x), _like(x)


def _qk_norm_rope(q: Tensor, k: Tensor, *args) -> tuple[Tensor, Tensor]:
    return _like(q), _like(k)


def _silu_and_mul(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _gemv_out(x: Tensor, weight: Tensor, silu: bool) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0] // 2 if silu else weight.shape[0]))


def _gemv(x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float, silu: bool) -> Tensor:
    return _gemv_out(x, weight, silu)


def _add_norm_gemv(x: Tensor, residual: Tensor, weight: Tensor, norm_weight: Tensor, eps: float,
                   silu: bool) -> tuple[Tensor, Tensor]:
    return _gemv_out(x, weight, silu), _like(x)


FAKES = {
    "rms_norm": _rms_norm,
    "fused_add_rms_norm": _fused_add_rms_norm,
    "qk_norm_rope": _qk_norm_rope,
    "qk_norm_rope_store": _qk_norm_rope,
    "silu_and_mul": _silu_and_mul,
    "gemv": _gemv,
    "add_norm_gemv": _add_norm_gemv,
}


def register() -> None:
    """Register every fake (call once per process, after torch.ops.myvllm exists)."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"myvllm::{name}", fake)
