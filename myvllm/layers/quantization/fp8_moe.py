"""Block-FP8 experts of an MoE layer: parameters, their loading, dummy values and the fused op.

A `FusedMoE` built with an `Fp8MoEMethod` holds, in place of its unquantized stacks,
  - `w13_weight` float8_e4m3fn [E, 2I, H] with `w13_weight_scale_inv` float32 [E, 2I / 128, ceil(H / 128)],
  - `w2_weight` float8_e4m3fn [E, H, I] with `w2_weight_scale_inv` float32 [E, ceil(H / 128), I / 128],
I being this rank's share of moe_intermediate_size. They are filled from the per-expert
checkpoint tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` and `.weight_scale_inv` (the
scales in bf16, fp16 or fp32), through the same `expert_params_mapping` as the unquantized
weights, so a missing, unexpected or mis-shaped tensor fails the same way, naming it.

Tensor parallelism splits the intermediate dim on block boundaries, as vLLM requires: I must be
a whole number of blocks (gate and up are stacked in one matrix, and a rank's share of down's
columns must start on a block), so a rank's scales are whole rows (columns) of the checkpoint's.
An off-grid I (Qwen3-30B-A3B's 768 over 4 ranks: 192) raises ValueError at build time. The
hidden dim is not split and may end in a ragged block.

On GPUs with fp8 tensor cores the op is kernels/triton_fp8_moe.py; elsewhere the experts are
dequantized to the activations' dtype and run by the torch reference (kernels/reference_fp8_moe.py).
The router (`mlp.gate`) is not an expert and stays unquantized, as in Qwen's FP8 checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from myvllm.kernels import reference_fp8, reference_fp8_moe
from myvllm.kernels.reference_fp8 import FP8_DTYPE, cdiv
from myvllm.kernels.triton_or_reference import triton_or_reference
from myvllm.layers.quantization.config import Fp8Config
from myvllm.layers.quantization.fp8 import SCALE_DTYPES, check_dtype
from myvllm.models.weight_utils import Loaded, copy_checked, shard

logger = logging.getLogger(__name__)

# the checkpoint projections of one expert, as FusedMoE's shard ids name them
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DUMMY_EXPERTS_PER_STEP = 16  # experts quantized at once by init_dummy, bounding its float32 scratch


class Fp8MoEMethod:
    """Block-FP8 stacked experts and their fused op on one device; one per model."""

    def __init__(self, config: Fp8Config, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self._op, reason = triton_or_reference(device, "myvllm.kernels.triton_fp8_moe", "fused_experts_fp8",
                                               reference_fp8_moe.fused_experts_dequant, config.block_n,
                                               config.block_k, dtype)
        self.uses_triton = reason is None
        op = "the Triton block-FP8 fused MoE" if self.uses_triton else (
            f"experts dequantized to {dtype} and the torch reference (Triton block-FP8 fused MoE not used: {reason})")
        logger.info("block-FP8 experts %s: %s", list(config.weight_block_size), op)

    @property
    def fused_experts(self) -> Callable:
        """The op: (x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_n, block_k) -> [T, H]."""
        return self._op

    def for_layer(self, prefix: str, num_experts: int) -> Fp8MoEMethod | None:
        """The method of the experts of MoE block `prefix` (model.layers.3.mlp): None when
        modules_to_not_convert names all their projections, ValueError when it names some."""
        names = [f"{prefix}.experts.{e}.{p}" for e in range(num_experts) for p in PROJECTIONS]
        skipped = [self.config.is_skipped(n) for n in names]
        if all(skipped):
            return None
        if any(skipped):
            named = [n for n, s in zip(names, skipped) if s]
            raise ValueError(f"quantization_config.modules_to_not_convert names some but not all expert "
                             f"projections of {prefix}.experts (e.g. {named[:3]}), which the model stacks "
                             f"into one matrix")
        return self

    def create_weights(self, moe: nn.Module, prefix: str) -> None:
        """Give moe (a FusedMoE being built) its fp8 stacks and float32 scales, on the default device."""
        bn, bk = self.config.block_n, self.config.block_k
        num_experts, hidden, inter = moe.num_experts, moe.hidden_size, moe.shard_size
        if inter % bn or inter % bk:
            raise ValueError(f"{prefix}.experts: moe_intermediate_size per rank {inter} (moe_intermediate_size="
                             f"{moe.intermediate_size}, tensor_parallel_size={moe.tp.size}) is not a multiple of "
                             f"the FP8 block size {list(self.config.weight_block_size)}")

        def param(*shape, dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        moe.w13_weight = param(num_experts, 2 * inter, hidden, dtype=FP8_DTYPE)
        moe.w13_weight_scale_inv = param(num_experts, 2 * inter // bn, cdiv(hidden, bk), dtype=torch.float32)
        moe.w2_weight = param(num_experts, hidden, inter, dtype=FP8_DTYPE)
        moe.w2_weight_scale_inv = param(num_experts, cdiv(hidden, bn), inter // bk, dtype=torch.float32)

        def weight_loader(param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, str]) -> None:
            check_dtype("weight", loaded, (FP8_DTYPE,))
            moe.weight_loader(param, loaded, shard_id)

        def scale_loader(param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, str]) -> None:
            check_dtype("weight_scale_inv", loaded, SCALE_DTYPES)
            self.load_scale(moe, param, loaded, shard_id)

        moe.w13_weight.weight_loader = moe.w2_weight.weight_loader = weight_loader
        moe.w13_weight_scale_inv.weight_loader = moe.w2_weight_scale_inv.weight_loader = scale_loader

    def load_scale(self, moe: nn.Module, param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, str]) -> None:
        """Expert e's block scales of projection proj (shard_id = (e, proj)): gate/up
        [intermediate / bn, ceil(H / bk)] fill this rank's rows of w13's scales, down
        [ceil(H / bn), intermediate / bk] this rank's columns of w2's; the weight's sharding in blocks."""
        expert, proj = shard_id
        bn, bk = self.config.block_n, self.config.block_k
        rank = moe.tp.rank
        if proj == "down_proj":
            copy_checked(param.data[expert], shard(loaded, 1, moe.intermediate_size // bk, rank, moe.shard_size // bk))
            return
        rows = moe.shard_size // bn
        offset = 0 if proj == "gate_proj" else rows
        copy_checked(param.data[expert].narrow(0, offset, rows),
                     shard(loaded, 0, moe.intermediate_size // bn, rank, rows))

    def apply(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], the routing [T, K] -> this rank's weighted sum of the experts [T, H]."""
        return self._op(x, moe.w13_weight, moe.w13_weight_scale_inv, moe.w2_weight, moe.w2_weight_scale_inv,
                        topk_weights, topk_ids, self.config.block_n, self.config.block_k)

    def init_dummy(self, moe: nn.Module, std: float, gen: torch.Generator) -> None:
        """Random experts N(0, std), quantized to blocks, a few experts at a time."""
        bn, bk = self.config.block_n, self.config.block_k
        for weight, scale in ((moe.w13_weight, moe.w13_weight_scale_inv), (moe.w2_weight, moe.w2_weight_scale_inv)):
            for start in range(0, weight.shape[0], DUMMY_EXPERTS_PER_STEP):
                part = weight.data[start:start + DUMMY_EXPERTS_PER_STEP]
                w = torch.empty(part.shape, dtype=torch.float32, device=weight.device).normal_(0.0, std, generator=gen)
                q, s = reference_fp8.quantize_weight(w, bn, bk)
                part.copy_(q)
                scale.data[start:start + DUMMY_EXPERTS_PER_STEP].copy_(s)
