"""Block-FP8 linear layers: parameters, their loading, dummy values and the GEMM dispatch.

The model gives each of its linear layers `method.for_layer(checkpoint names)`: the method, or
None for a layer that modules_to_not_convert names. A layer built with the method holds
  - `weight` float8_e4m3fn [N, K] (this rank's rows / columns), and
  - `weight_scale_inv` float32 [ceil(N / block_n), ceil(K / block_k)], one scale per block,
created in these dtypes (an FP8 model never holds an unquantized copy of its weights); the
checkpoint may store the scales in bf16, fp16 or fp32.

Tensor parallelism splits on block boundaries, as vLLM requires: a rank's share of a split dim
and each projection of a packed layer (q/k/v, gate/up) must be a whole number of blocks, so the
scales of a rank's part are whole rows (columns) of the checkpoint's scales and a packed layer's
scales are its projections' scales stacked (q rows, then k, then v). Only an unsplit, unpacked
dim may end in a ragged block. A layer whose shapes break this raises ValueError at build time.

The GEMM is kernels/triton_fp8_gemm.py on GPUs with fp8 tensor cores (activations quantized per
token group of block_k on the fly); elsewhere the weight is dequantized to the activations'
dtype at each call and multiplied with torch (kernels/reference_fp8.py). The fused norm +
projection kernels take unquantized weights only: a quantized layer runs the norm, then this
GEMM (layers/linear.py), as logged once when the method is built.

The stacked expert weights of an MoE layer have their own method (fp8_moe.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from myvllm.kernels import reference_fp8
from myvllm.kernels.reference_fp8 import FP8_DTYPE, cdiv
from myvllm.kernels.triton_or_reference import triton_or_reference
from myvllm.layers.linear import LinearBase
from myvllm.layers.quantization.config import Fp8Config
from myvllm.models.weight_utils import Loaded, copy_checked, shard

logger = logging.getLogger(__name__)

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_dtype(what: str, loaded: Loaded, allowed: tuple[torch.dtype, ...]) -> None:
    if loaded.dtype not in allowed:
        raise ValueError(f"{what} has dtype {loaded.dtype}, a block-FP8 layer takes {[str(d) for d in allowed]}")


class Fp8LinearMethod:
    """Block-FP8 weights of linear layers and their GEMM on one device; one per model."""

    def __init__(self, config: Fp8Config, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self._linear, reason = triton_or_reference(device, "myvllm.kernels.triton_fp8_gemm", "w8a8_block_linear",
                                                   reference_fp8.dequant_linear, config.block_n, config.block_k,
                                                   dtype)
        self.uses_triton = reason is None
        gemm = "the Triton block-FP8 GEMM" if self.uses_triton else (
            f"weights dequantized to {dtype} and torch matmul (Triton block-FP8 GEMM not used: {reason})")
        logger.info("block-FP8 linear layers %s: %s; each norm runs before its projection (the fused "
                    "norm + projection kernels take unquantized weights)", list(config.weight_block_size), gemm)

    def for_layer(self, names: list[str]) -> Fp8LinearMethod | None:
        """The method of a linear layer that packs the checkpoint modules `names` (e.g.
        [model.layers.0.self_attn.q_proj, k_proj, v_proj]): None when modules_to_not_convert names
        them all, ValueError when it names some but not all (one matrix holds them all)."""
        skipped = [self.config.is_skipped(n) for n in names]
        if all(skipped):
            return None
        if any(skipped):
            raise ValueError(f"quantization_config.modules_to_not_convert names some but not all of {names}, "
                             f"which the model packs into one matrix")
        return self

    def check_shapes(self, layer: LinearBase, prefix: str) -> None:
        """ValueError unless this rank's split dims and packed projections are whole blocks."""
        bn, bk = self.config.block_n, self.config.block_k
        k = layer.input_size_per_partition
        split = layer.tp.size > 1
        if split and layer.tp_dim == 1 and k % bk:
            raise ValueError(f"{prefix}: input features per rank {k} (tensor_parallel_size={layer.tp.size}) "
                             f"are not a multiple of the FP8 block_k={bk}")
        sizes = layer.output_partition_sizes()
        if len(sizes) > 1 or (split and layer.tp_dim == 0):
            for size in sizes:
                if size % bn:
                    raise ValueError(f"{prefix}: output rows per projection and rank {sizes} "
                                     f"(tensor_parallel_size={layer.tp.size}) are not multiples of the FP8 "
                                     f"block_n={bn}")

    def create_weights(self, layer: LinearBase, prefix: str) -> None:
        """Give layer (being built) fp8 weight and float32 weight_scale_inv parameters, on the
        default device; prefix names the layer in errors."""
        self.check_shapes(layer, prefix)
        n, k = layer.output_size_per_partition, layer.input_size_per_partition
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE), requires_grad=False)
        scale = torch.empty(cdiv(n, self.config.block_n), cdiv(k, self.config.block_k), dtype=torch.float32)
        layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)

        def weight_loader(param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
            check_dtype("weight", loaded, (FP8_DTYPE,))
            if shard_id is None:
                layer.weight_loader(param, loaded)
            else:
                layer.weight_loader(param, loaded, shard_id)

        def scale_loader(param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
            check_dtype("weight_scale_inv", loaded, SCALE_DTYPES)
            self.load_scale(layer, param, loaded, shard_id)

        layer.weight.weight_loader = weight_loader
        layer.weight_scale_inv.weight_loader = scale_loader

    def load_scale(self, layer: LinearBase, param: nn.Parameter, loaded: Loaded, shard_id) -> None:
        """This rank's block scales of a checkpoint's weight_scale_inv: the weight's sharding in units of
        blocks (exact, as check_shapes holds)."""
        if shard_id is None:
            LinearBase.weight_loader(layer, param, loaded)  # splits along tp_dim by the param's shape
            return
        bn = self.config.block_n
        offset, size, full, rank = layer.packed_slice(shard_id)
        if layer.tp.size > 1:
            loaded = shard(loaded, 0, cdiv(full, bn), rank, size // bn)
        copy_checked(param.data.narrow(0, offset // bn, cdiv(size, bn)), loaded)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ the dequantized weight.T -> [T, N] in x's dtype."""
        bn, bk = self.config.block_n, self.config.block_k
        return self._linear(x, layer.weight, layer.weight_scale_inv, bn, bk)

    def init_dummy(self, layer: LinearBase, std: float, gen: torch.Generator) -> None:
        """Random weights N(0, std), quantized to blocks: what a quantized checkpoint of them holds."""
        w = torch.empty(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
        w.normal_(0.0, std, generator=gen)
        q, scale = reference_fp8.quantize_weight(w, self.config.block_n, self.config.block_k)
        layer.weight.data.copy_(q)
        layer.weight_scale_inv.data.copy_(scale)
