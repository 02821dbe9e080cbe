"""Linear layers laid out for tensor parallelism, each weight with its own loader.

Column-parallel layers split the output features over ranks; row-parallel layers
split the input features and sum the partial products with an all-reduce. Each
parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which
checks the shape of the whole checkpoint tensor and copies this rank's part of it
into the parameter (and, for packed layers, into the right slice). The checkpoint
tensor may be a `CheckpointTensor`, which reads from the file only that part.

A column-parallel layer also takes a `NormPrologue` (layers/norm.py): the RMSNorm that
feeds it, and the residual add before that norm, then run inside the projection.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.norm import NormPrologue
from myvllm.models.weight_utils import Loaded, copy_checked, shard


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, tp: TensorParallelGroup, tp_dim: int | None,
                 ops) -> None:
        super().__init__()
        self.tp = tp
        self.tp_dim = tp_dim  # which weight dim is split over ranks (None: replicated)
        self.ops = ops  # kernels.fused_ops.FusedOps: a matrix-vector kernel for few tokens, else cuBLAS
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if self.tp_dim is not None and self.tp.size > 1:
            size = param.shape[self.tp_dim]
            loaded = shard(loaded, self.tp_dim, size * self.tp.size, self.tp.rank, size)
        copy_checked(param, loaded)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, ops, tp: TensorParallelGroup = SINGLE) -> None:
        if output_size % tp.size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size={tp.size}")
        super().__init__(input_size, output_size // tp.size, tp, 0, ops)

    def forward(self, x: NormPrologue, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the normalised input's operands -> (this rank's projection [T, N], or silu(gate) * up
        [T, N / 2] of a packed [gate; up] with silu, and the residual stream x.x + x.residual)."""
        return x.project(self.weight, self.ops, silu)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matrix (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], ops, tp: TensorParallelGroup = SINGLE) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), ops, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        if self.tp.size > 1:
            loaded = shard(loaded, 0, self.output_sizes[shard_id], self.tp.rank, size)
        copy_checked(param.data.narrow(0, offset, size), loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads; KV heads are replicated
    when there are fewer of them than ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, ops,
        tp: TensorParallelGroup = SINGLE,
    ) -> None:
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor_parallel_size={tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} and tensor_parallel_size={tp.size}: one must divide the other"
            )
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, out, tp, 0, ops)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank, total = 0, q_size, self.tp.rank, self.total_num_heads
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank, total = kv_size, self.tp.rank // self.kv_replicas, self.total_num_kv_heads
        if self.tp.size > 1:
            loaded = shard(loaded, 0, total * self.head_dim, rank, size)
        copy_checked(param.data.narrow(0, offset, size), loaded)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, ops, tp: TensorParallelGroup = SINGLE) -> None:
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size={tp.size}")
        super().__init__(input_size // tp.size, output_size, tp, 1, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, this rank's share of the input features] -> [T, N], summed over the ranks."""
        return self.tp.all_reduce(self.ops.linear(x, self.weight))
