"""The choice between a Triton op and its torch reference, for one device.

A Triton kernel module (kernels/triton_*.py) says with `supports(device, *args)` whether it
runs: None, or the reason it does not. Off CUDA the module is not imported, so that the torch
path runs without triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


def triton_or_reference(device: torch.device, module: str, op: str, reference: Callable,
                        *support_args) -> tuple[Callable, str | None]:
    """(module.op, None) where module.supports(device, *support_args) accepts device, else
    (reference, the reason the Triton op is not used). module: a dotted module path."""
    device = torch.device(device)
    if device.type != "cuda":
        return reference, f"device {device} is not CUDA"
    kernels = importlib.import_module(module)
    reason = kernels.supports(device, *support_args)
    if reason is not None:
        return reference, reason
    return getattr(kernels, op), None
