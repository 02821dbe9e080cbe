"""Linear layers laid out for tensor parallelism, each weight with its own loader.

Column-parallel layers split the output features over ranks; row-parallel layers
split the input features and sum the partial products with an all-reduce. Each
parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which
checks the shape of the whole checkpoint tensor and copies this rank's part of it
into the parameter (and, for packed layers, into the right slice). The checkpoint
tensor may be a `CheckpointTensor`, which reads from the file only that part.

A column-parallel layer also takes a `NormPrologue` (layers/norm.py): the RMSNorm that
feeds it, and the residual add before that norm, then run inside the projection.

A layer built with a `quant_method` (layers/quantization/fp8.py's Fp8LinearMethod) holds the
method's quantized parameters, created in their own dtype, and multiplies through it; the fused
norm + projection kernels take unquantized weights only, so such a layer runs the norm, then
the method's GEMM. `packed_slice` says where a packed shard lies, for weights and their scales.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.norm import NormPrologue
from myvllm.models.weight_utils import Loaded, copy_checked, shard


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, tp: TensorParallelGroup, tp_dim: int | None,
                 ops, quant_method=None, prefix: str = "") -> None:
        """input_size, output_size: this rank's weight [output_size, input_size]. quant_method
        (e.g. layers.quantization.fp8.Fp8LinearMethod; None: unquantized) creates the layer's
        parameters in its format; prefix: the layer's module name, for its errors."""
        super().__init__()
        self.tp = tp
        self.tp_dim = tp_dim  # which weight dim is split over ranks (None: replicated)
        self.ops = ops  # kernels.fused_ops.FusedOps: a matrix-vector kernel for few tokens, else cuBLAS
        self.output_size_per_partition = output_size
        self.input_size_per_partition = input_size
        self.quant_method = quant_method
        if quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            quant_method.create_weights(self, prefix)

    def output_partition_sizes(self) -> list[int]:
        """This rank's output rows of each packed projection (one entry when not packed)."""
        return [self.output_size_per_partition]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ this rank's weight.T -> [T, N] (no all-reduce)."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return self.ops.linear(x, self.weight)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if self.tp_dim is not None and self.tp.size > 1:
            size = param.shape[self.tp_dim]
            loaded = shard(loaded, self.tp_dim, size * self.tp.size, self.tp.rank, size)
        copy_checked(param, loaded)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, ops, tp: TensorParallelGroup = SINGLE,
                 quant_method=None, prefix: str = "") -> None:
        if output_size % tp.size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size={tp.size}")
        super().__init__(input_size, output_size // tp.size, tp, 0, ops, quant_method, prefix)

    def forward(self, x: NormPrologue, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the normalised input's operands -> (this rank's projection [T, N], or silu(gate) * up
        [T, N / 2] of a packed [gate; up] with silu, and the residual stream x.x + x.residual)."""
        if self.quant_method is None:
            return x.project(self.weight, self.ops, silu)
        hidden, residual = x.normalize(self.ops)
        out = self.matmul(hidden)
        return (self.ops.silu_and_mul(out) if silu else out), residual


def load_packed(layer, param: nn.Parameter, loaded: Loaded, shard_id) -> None:
    """Copy this rank's part of one packed projection's checkpoint tensor into its rows of param."""
    offset, size, full, rank = layer.packed_slice(shard_id)
    if layer.tp.size > 1:
        loaded = shard(loaded, 0, full, rank, size)
    copy_checked(param.data.narrow(0, offset, size), loaded)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matrix (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], ops, tp: TensorParallelGroup = SINGLE,
                 quant_method=None, prefix: str = "") -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), ops, tp, quant_method, prefix)

    def output_partition_sizes(self) -> list[int]:
        return [size // self.tp.size for size in self.output_sizes]

    def packed_slice(self, shard_id: int) -> tuple[int, int, int, int]:
        """(first row in this rank's weight, rows, rows of the checkpoint tensor, which part of it
        this rank holds) of projection shard_id."""
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        return offset, size, self.output_sizes[shard_id], self.tp.rank

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:
        load_packed(self, param, loaded, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads; KV heads are replicated
    when there are fewer of them than ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, ops,
        tp: TensorParallelGroup = SINGLE, quant_method=None, prefix: str = "",
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
        LinearBase.__init__(self, hidden_size, out, tp, 0, ops, quant_method, prefix)

    def output_partition_sizes(self) -> list[int]:
        kv_size = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv_size, kv_size]

    def packed_slice(self, shard_id: str) -> tuple[int, int, int, int]:
        """(first row in this rank's weight, rows, rows of the checkpoint tensor, which part of it
        this rank holds) of shard_id "q", "k" or "v"."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size, self.total_num_heads * self.head_dim, self.tp.rank
        offset = q_size if shard_id == "k" else q_size + kv_size
        return offset, kv_size, self.total_num_kv_heads * self.head_dim, self.tp.rank // self.kv_replicas

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:
        load_packed(self, param, loaded, shard_id)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, ops, tp: TensorParallelGroup = SINGLE,
                 quant_method=None, prefix: str = "") -> None:
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size={tp.size}")
        super().__init__(input_size // tp.size, output_size, tp, 1, ops, quant_method, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, this rank's share of the input features] -> [T, N], summed over the ranks."""
        return self.tp.all_reduce(self.matmul(x))
