"""Tensor-parallel group handle, passed explicitly to every layer that is split.

With size 1 (the default) every collective is a no-op, so single-GPU runs pay
nothing for the tensor-parallel layout of the layers.

With size N, `group` carries the tensors of the forward (NCCL on GPUs, gloo on
CPU) and `cpu_group` (gloo in both cases) the few host-side values ranks agree on
at start. A dead peer makes a gloo operation fail at once, where an NCCL one would
wait; so whatever can fail before the first forward (loading, sizing the KV cache)
meets the other ranks on the gloo group.
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
# How long a rank waits for the others at start and inside one collective.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1
    cpu_group: Any = None  # a gloo ProcessGroup of the same ranks (== group on CPU)

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

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite x on every rank with rank src's x, in place (x must be contiguous)."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def host_min(self, value: int) -> int:
        """The smallest of every rank's value."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (fails at once if a rank has died)."""
        if self.size > 1:
            dist.barrier(group=self.cpu_group)


SINGLE = TensorParallelGroup()


def shard_range(total: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """[start, end) of this rank's even share of `total` (which the caller checked divides)."""
    size = total // tp.size
    return tp.rank * size, (tp.rank + 1) * size


def create_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS picks (read it from .port), so
    that engines on one host never collide."""
    return dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


def init_tensor_parallel(rank: int, world_size: int, store: dist.Store | int,
                         device: torch.device) -> TensorParallelGroup:
    """Join the process group of an engine: rank 0 passes the store it created, the
    others its port. NCCL between GPUs, gloo on CPU; plus a gloo group for host values."""
    if isinstance(store, int):
        store = dist.TCPStore(HOST, store, world_size, is_master=False, timeout=TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    hook = sys.excepthook  # init_process_group prefixes every later traceback with the rank: not ours
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    sys.excepthook = hook
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    return TensorParallelGroup(rank, world_size, group, cpu_group)


def destroy_tensor_parallel(abort: bool = False) -> None:
    """Leave the process group (abort: do not wait for operations in flight)."""
    if not dist.is_initialized():
        return
    if abort and hasattr(dist.distributed_c10d, "_abort_process_group"):
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except Exception:  # fall back to the ordinary teardown
            pass
    dist.destroy_process_group()
