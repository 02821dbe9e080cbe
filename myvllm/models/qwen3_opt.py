"""The Qwen3 dense decoder: the one definition of the architecture, built from layers/.

    embed -> [input_norm -> attention -> post_norm -> MLP] x L -> norm -> LM head

Each norm, with the residual add before it, runs inside the projection it feeds (qkv_proj,
gate_up_proj with SiLU, and the LM head, which runs on the sampled rows only): calling a norm
only names its operands (layers/norm.py), so the code reads like the diagram while a decode
step needs one CUDA kernel per norm + projection. Attention packs q/k/v into one projection,
then applies per-head RMSNorm to q and k, rotary, the KV store and paged attention
(layers/attention.py). `Qwen3Attention` is shared with the MoE decoder, which swaps the MLP.
`packed_modules_mapping` tells the loader which checkpoint tensors go into which slice of a
packed parameter.

With a quantization config (ModelConfig.quantization) the linear layers of the decoder are
built quantized (layers/quantization/fp8.py), each given its checkpoint module names so that
modules_to_not_convert is honoured; the embeddings, norms and LM head stay unquantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.config import ModelConfig
from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.attention import Attention
from myvllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from myvllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from myvllm.layers.norm import NormPrologue, RMSNorm
from myvllm.layers.quantization.fp8 import Fp8LinearMethod
from myvllm.layers.rotary import RotaryEmbedding


def linear_method(quant: Fp8LinearMethod | None, names: list[str]) -> Fp8LinearMethod | None:
    """The quantization method of a linear layer packing the checkpoint modules `names`."""
    return None if quant is None else quant.for_layer(names)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup, quant: Fp8LinearMethod | None = None, prefix: str = "") -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        qkv = [f"{prefix}.{p}_proj" for p in "qkv"]
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, ops, tp, linear_method(quant, qkv),
                                          f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, ops, tp,
                                        linear_method(quant, [f"{prefix}.o_proj"]), f"{prefix}.o_proj")
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, rotary, backend,
                              ops, self.q_norm.weight.dtype)

    def forward(self, positions: torch.Tensor, x: NormPrologue,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the layer's input norm and its operands -> (attention output [T, hidden], the residual
        stream that norm was applied to)."""
        qkv, residual = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # strided views of qkv
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, positions, self.q_norm, self.k_norm, meta)  # [T, H, D]
        return self.o_proj(out.view(num_tokens, self.q_size)), residual


class Qwen3MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with silu(gate) * up fused into the gate_up projection."""

    def __init__(self, cfg: ModelConfig, ops, tp: TensorParallelGroup, quant: Fp8LinearMethod | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        gate_up = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, ops, tp,
                                                       linear_method(quant, gate_up), f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, ops, tp,
                                           linear_method(quant, [f"{prefix}.down_proj"]), f"{prefix}.down_proj")

    def forward(self, x: NormPrologue) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the post-attention norm and its operands -> (MLP output [T, hidden], the residual stream)."""
        act, residual = self.gate_up_proj(x, silu=True)  # [T, I]
        return self.down_proj(act), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup, mlp: nn.Module | None = None, quant: Fp8LinearMethod | None = None,
                 prefix: str = "") -> None:
        """mlp: the feed-forward block, taking a NormPrologue (default: the dense Qwen3MLP);
        prefix: the layer's checkpoint name (model.layers.3)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, rotary, backend, ops, tp, quant, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else Qwen3MLP(cfg, ops, tp, quant, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's output, not yet added to residual (layer 0: the
        embeddings, residual None) -> (this layer's output, the residual stream before it)."""
        hidden, residual = self.self_attn(positions, self.input_layernorm(hidden, residual), meta)
        hidden, residual = self.mlp(self.post_attention_layernorm(hidden, residual))
        return hidden, residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup, mlp_of_layer: Callable[[int], nn.Module | None] | None = None,
                 quant: Fp8LinearMethod | None = None) -> None:
        """mlp_of_layer: layer index -> its feed-forward block (None: the dense one); the MoE decoder's hook.
        quant: the linear layers' quantization method (None: unquantized)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(cfg, self.rotary, backend, ops, tp, mlp_of_layer(i) if mlp_of_layer else None,
                              quant, f"model.layers.{i}")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the last layer's output, the residual stream before it), both [T, hidden]; their
        sum, normalised by self.norm, is the final hidden state (the LM head applies the norm)."""
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return hidden, residual


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (parameter name, shard id) for packed parameters
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup = SINGLE,
                 mlp_of_layer: Callable[[int], nn.Module | None] | None = None) -> None:
        """Built on the default device in the default dtype (the quantized parameters in theirs)."""
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg, max_position, backend, ops, tp, mlp_of_layer, self.linear_quant(cfg, ops))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ops, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def linear_quant(cfg: ModelConfig, ops) -> Fp8LinearMethod | None:
        """The linear layers' quantization method for cfg.quantization (None: unquantized)."""
        if cfg.quantization is None:
            return None
        return Fp8LinearMethod(cfg.quantization, ops.device, torch.get_default_dtype())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions [T] -> (hidden, residual) [T, hidden], before the final norm."""
        return self.model(input_ids, positions, meta)

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of rows of forward()'s output: the final norm and the LM head (one
        kernel for a few rows)."""
        return self.lm_head(self.model.norm(hidden, residual))

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [N, vocab] of the rows meta.logits_indices selects (the ones sampled)."""
        rows = meta.logits_indices
        return self.logits(hidden[rows], residual[rows])

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
