"""Tensor-parallel group handle, passed explicitly to every layer that is split.

With size 1 (the default) every collective is a no-op, so single-GPU runs pay
nothing for the tensor-parallel layout of the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank={self.rank} must be in [0, {self.size - 1}]")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's x along dim."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


SINGLE = TensorParallelGroup()


def shard_range(total: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """[start, end) of this rank's even share of `total` (which the caller checked divides)."""
    size = total // tp.size
    return tp.rank * size, (tp.rank + 1) * size
