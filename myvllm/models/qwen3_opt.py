"""The Qwen3 dense decoder, built from layers/ and the ops in kernels/.

    embed -> [input_norm -> attention -> post_norm -> MLP] x L -> norm -> LM head

Residual adds are fused into the following RMSNorm, and each RMSNorm into the projection it
feeds (qkv, gate_up with SiLU, and the final norm into the LM head, which runs on the sampled
rows only; one CUDA kernel for a few tokens, see RMSNorm.project).
Attention packs q/k/v into one projection, applies per-head RMSNorm to q and k, then rotary,
then paged attention.
`packed_modules_mapping` tells the loader which checkpoint tensors go into which
slice of a packed parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.config import ModelConfig
from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.attention import Attention
from myvllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from myvllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from myvllm.layers.norm import RMSNorm
from myvllm.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.ops = ops
        self.eps = cfg.rms_norm_eps
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, tp, ops)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, backend)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) * D]: qkv_proj of the normalised hidden states (the decoder layer
        computes it, fused with the norm) -> o_proj of the attention [T, hidden]."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # strided views of qkv
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.ops.uses_cuda_kernels:  # one kernel also writes K and V into the paged cache
            q, k = self.ops.qk_norm_rope_store(q, k, v, self.q_norm.weight, self.k_norm.weight, self.eps,
                                               positions, self.rotary.cos_sin_cache, self.attn.k_cache,
                                               self.attn.v_cache, meta.slot_mapping)
            out = self.attn(q, k, v, meta, kv_stored=True)  # [T, H, D]
        else:
            q, k = self.ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.eps, positions,
                                         self.rotary.cos_sin_cache)
            out = self.attn(q, k, v, meta)  # [T, H, D]
        return self.o_proj(out.view(num_tokens, self.q_size))


class Qwen3MLP(nn.Module):
    """down(silu(gate(x)) * up(x)). The decoder layer computes silu(gate) * up fused with the
    post-attention norm (RMSNorm.project over gate_up_proj's weight); forward takes that."""

    def __init__(self, cfg: ModelConfig, ops, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, ops)

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act)  # [T, I] -> [T, hidden]


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Qwen3Attention(cfg, rotary, backend, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = Qwen3MLP(cfg, ops, tp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's output, not yet added to residual (layer 0: the
        embeddings, residual None) -> (this layer's output, the residual stream before it)."""
        qkv, residual = self.input_layernorm.project(hidden, residual, self.self_attn.qkv_proj.weight)
        hidden = self.self_attn(positions, qkv, meta)
        act, residual = self.post_attention_layernorm.project(hidden, residual, self.mlp.gate_up_proj.weight,
                                                              silu=True)
        return self.mlp(act), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, ops,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta)
        self.rotary = rotary
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(cfg, rotary, backend, ops, tp) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

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
                 tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg, max_position, backend, ops, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions [T] -> (hidden, residual) [T, hidden], before the final norm."""
        return self.model(input_ids, positions, meta)

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of rows of forward()'s output: the final norm and the LM head (one
        kernel for a few rows)."""
        local, _ = self.model.norm.project(hidden, residual, self.lm_head.weight)
        return self.lm_head.gather(local)

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [N, vocab] of the rows meta.logits_indices selects (the ones sampled)."""
        rows = meta.logits_indices
        return self.logits(hidden[rows], residual[rows])

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
