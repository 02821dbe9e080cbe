"""Copies between host and device that do not make the host wait for the device.

Inputs go to the device through pinned memory (host_to_device). A decode window's
sampled tokens are needed on the host only after the next window has been launched,
so their copy goes to pinned memory with non_blocking=True, and an event marks when
it has landed (HostCopy).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a host array to the device without a host sync (through pinned memory on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _on_cuda(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _start_copy(value):
    if not _on_cuda(value):
        return value
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    return host


class HostCopy:
    """A tensor, or a dataclass of tensors, copied to the host; result() waits for the copy."""

    def __init__(self, value) -> None:
        if dataclasses.is_dataclass(value):
            parts = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            on_cuda = any(_on_cuda(v) for v in parts.values())
            self._value = dataclasses.replace(value, **{k: _start_copy(v) for k, v in parts.items()})
        else:
            on_cuda = _on_cuda(value)
            self._value = _start_copy(value)
        self._event = None
        if on_cuda:  # recorded on the current stream, after the copies
            self._event = torch.cuda.Event()
            self._event.record()

    def done(self) -> bool:
        """Whether the copy has landed (result() would not wait)."""
        return self._event is None or self._event.query()

    def result(self):
        if self._event is not None:
            self._event.synchronize()
        return self._value
