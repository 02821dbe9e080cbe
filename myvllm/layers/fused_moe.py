"""The experts of a sparse MoE layer, as stacked weights, and the router that picks them.

`FusedMoE` holds every expert of one layer in two parameters, w13_weight [E, 2I, H] (each
expert's gate rows, then its up rows) and w2_weight [E, H, I], so that one fused op
(kernels/triton_fused_moe.py on CUDA, kernels/reference_moe.py elsewhere) runs all of
them. Under tensor parallelism each rank holds a slice of every expert's intermediate
dimension (I = moe_intermediate_size / tp): gate/up split by rows, down by columns, and the
partial outputs are summed with an all-reduce, as the dense MLP's are. The router is
replicated, so every rank routes each token to the same experts.

The checkpoint stores one tensor per expert and projection
(`mlp.experts.{e}.{gate,up,down}_proj.weight`); `expert_params_mapping` names, for the
loader, the parameter and shard (expert, projection) each of them fills. Built with a
`quant_method` (layers/quantization/fp8_moe.py) the layer holds block-FP8 stacks and their
scales (`*_weight_scale_inv`, filled through the same mapping) and runs the method's op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.kernels import reference_moe
from myvllm.kernels.triton_or_reference import triton_or_reference
from myvllm.models.weight_utils import Loaded, copy_checked, shard

logger = logging.getLogger(__name__)

FusedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# checkpoint projection -> (stacked parameter, rows of it the projection fills)
PROJECTIONS = {"gate_proj": "w13_", "up_proj": "w13_", "down_proj": "w2_"}


def select_fused_experts(device: torch.device, dtype: torch.dtype) -> FusedExperts:
    """The fused-experts op for a model on device in dtype: on CUDA the Triton kernel where it
    runs (else the torch reference, the reason logged at INFO); elsewhere the torch reference,
    without importing triton."""
    op, reason = triton_or_reference(device, "myvllm.kernels.triton_fused_moe", "fused_experts",
                                     reference_moe.fused_experts, dtype)
    if reason is not None and device.type == "cuda":  # off CUDA the reference is the expected op
        logger.info("fused MoE: Triton kernel not used (%s); running the torch reference instead", reason)
    return op


def expert_params_mapping(num_experts: int) -> list[tuple[str, str, tuple[int, str]]]:
    """(checkpoint name part, parameter name part, shard id) of every expert tensor, e.g.
    (".experts.3.up_proj.", ".experts.w13_", (3, "up_proj")): the loader replaces the first by
    the second (model.layers.1.mlp.experts.3.up_proj.weight -> model.layers.1.mlp.experts.w13_weight)."""
    return [(f".experts.{e}.{proj}.", f".experts.{param}", (e, proj))
            for e in range(num_experts) for proj, param in PROJECTIONS.items()]


class TopKRouter(nn.Module):
    """The gate: router logits [T, E] = x @ weight.T, softmax, top-k (renormalised when asked)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, ops) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (normalised) -> (routing weights [T, K] in x's dtype, expert ids [T, K])."""
        return reference_moe.topk_softmax(self.ops.linear(x, self.weight), self.top_k, self.renormalize)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, fused_experts: FusedExperts,
                 tp: TensorParallelGroup = SINGLE, quant_method=None, prefix: str = "") -> None:
        """fused_experts: the unquantized op (select_fused_experts); quant_method (e.g.
        layers.quantization.fp8_moe.Fp8MoEMethod; None: unquantized) creates quantized stacks
        and runs them; prefix: the MoE block's module name (model.layers.3.mlp), for errors."""
        super().__init__()
        if intermediate_size % tp.size:
            raise ValueError(f"moe_intermediate_size={intermediate_size} is not divisible by "
                             f"tensor_parallel_size={tp.size}")
        self.tp = tp
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size  # of the checkpoint's experts
        self.shard_size = intermediate_size // tp.size  # I: this rank's slice
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, prefix)
            self.fused_experts = quant_method.fused_experts
            return
        self.fused_experts = fused_experts
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.shard_size, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard_size), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, str]) -> None:
        """loaded: expert e's whole checkpoint tensor of projection proj (shard_id = (e, proj));
        gate/up [intermediate, H] fill rows [0, I) / [I, 2I) of w13[e], down [H, intermediate] w2[e]."""
        expert, proj = shard_id
        size, rank = self.shard_size, self.tp.rank
        if proj == "down_proj":
            copy_checked(param.data[expert], shard(loaded, 1, self.intermediate_size, rank, size))
            return
        offset = 0 if proj == "gate_proj" else size
        copy_checked(param.data[expert].narrow(0, offset, size), shard(loaded, 0, self.intermediate_size, rank, size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] (normalised), the router's choice [T, K] -> the experts' weighted sum [T, H],
        summed over the ranks."""
        if self.quant_method is not None:
            out = self.quant_method.apply(self, x, topk_weights, topk_ids)
        else:
            out = self.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return self.tp.all_reduce(out)
