"""The Qwen3 MoE decoder (Qwen3-30B-A3B, Qwen3-235B-A22B): the dense decoder of qwen3_opt.py
with a sparse block in place of the MLP on the layers the config makes sparse.

    embed -> [input_norm -> attention -> post_norm -> (sparse block | MLP)] x L -> norm -> LM head

    sparse block:  h = post_norm(x + residual)
                   weights, experts = top-k(softmax(gate(h)))        [T, K] each
                   out = sum_k weights[:, k] * expert_k(h)           (layers/fused_moe.py)

Attention, the norms, the embedding and the LM head are qwen3_opt.py's. A layer is sparse as
`ModelConfig.is_sparse_layer` says (mlp_only_layers, decoder_sparse_step); the others keep the
dense MLP. The experts of a layer are stacked into two parameters that the loader fills from
the per-expert checkpoint tensors through `expert_params_mapping`. With a quantization config
the experts are built in block-FP8 (layers/quantization/fp8_moe.py) as the linear layers are;
the router stays unquantized.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend
from myvllm.config import ModelConfig
from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.fused_moe import FusedExperts, FusedMoE, TopKRouter, expert_params_mapping, select_fused_experts
from myvllm.layers.norm import NormPrologue
from myvllm.layers.quantization.fp8_moe import Fp8MoEMethod
from myvllm.models.qwen3_opt import Qwen3ForCausalLM


class Qwen3MoeSparseBlock(nn.Module):
    """The router (`gate`, replicated over ranks) and the layer's experts."""

    def __init__(self, cfg: ModelConfig, ops, tp: TensorParallelGroup, fused_experts: FusedExperts,
                 quant: Fp8MoEMethod | None = None, prefix: str = "") -> None:
        """quant: the experts' quantization method (None: unquantized); prefix: the block's
        checkpoint name (model.layers.3.mlp)."""
        super().__init__()
        self.ops = ops
        self.gate = TopKRouter(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, ops)
        quant = None if quant is None else quant.for_layer(prefix, cfg.num_experts)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, fused_experts, tp,
                                quant, prefix)

    def forward(self, x: NormPrologue) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the post-attention norm and its operands -> (the experts' output [T, hidden], the residual stream)."""
        hidden, residual = x.normalize(self.ops)  # [T, hidden] each
        topk_weights, topk_ids = self.gate(hidden)  # [T, K] each
        return self.experts(hidden, topk_weights, topk_ids), residual


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup = SINGLE) -> None:
        # The parameters are made in the default dtype, so that is the dtype the experts run in.
        fused_experts = select_fused_experts(ops.device, torch.get_default_dtype())
        quant = None
        if cfg.quantization is not None:
            quant = Fp8MoEMethod(cfg.quantization, ops.device, torch.get_default_dtype())

        def mlp_of_layer(layer: int) -> nn.Module | None:
            if not cfg.is_sparse_layer(layer):
                return None
            return Qwen3MoeSparseBlock(cfg, ops, tp, fused_experts, quant, f"model.layers.{layer}.mlp")

        super().__init__(cfg, max_position, backend, ops, tp, mlp_of_layer)
        # checkpoint name part -> parameter name part, shard id, for every expert's tensors
        self.expert_params_mapping = expert_params_mapping(cfg.num_experts)
