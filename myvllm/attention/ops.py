"""The attention backends' kernels as torch custom ops, opaque to torch.compile.

A compiled forward (runtime/compilation.py) traces the model down to these ops and no
further: each is one node of the graph, with a fake version that gives only the output's
shape, so the compiler fuses the work between attention calls and never looks inside the
paged-cache kernels (vLLM's piecewise compilation splits its graph at the same place). The
KV stores declare the caches they write, so the compiler keeps every store before the
attention that reads it.

Outside a compiled trace a backend calls the kernel's function itself (`OpaqueOp.__call__`):
the custom-op dispatch costs host time on every eager step and buys nothing there.

Every op takes only tensors and numbers (the caches' k_scale / v_scale [Hkv] float32 among
them, which only an fp8 cache reads): the scalars a kernel derives from the step (split
counts, the varlen key offsets) are computed inside the op or by the backend's `prepare`,
never in the traced code, so they do not become guards of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from myvllm.kernels import reference

NAMESPACE = "myvllm_attn"  # `myvllm` is owned by the CUDA extension's TORCH_LIBRARY


class OpaqueOp:
    """A function registered as the custom op NAMESPACE::name: the op inside a compiled trace,
    the function itself otherwise. fake(*args) returns the output's shape only."""

    def __init__(self, name: str, fn: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
        self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.fn(*args)


def _store_fake(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


def _attention_fake(q, *args) -> torch.Tensor:
    return torch.empty_like(q)


# ---- torch (the CPU path and the oracle) ----------------------------------------------------

def _torch_store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _torch_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                     seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None) -> torch.Tensor:
    return reference.paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, k_scale,
                                     v_scale)


torch_store_kv = OpaqueOp("torch_store_kv", _torch_store_kv, _store_fake, ("k_cache", "v_cache"))
torch_attention = OpaqueOp("torch_attention", _torch_attention, _attention_fake)


# ---- Triton ---------------------------------------------------------------------------------

def _triton_store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    from myvllm.kernels.triton_kv_store import store_kvcache

    store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor, scale: float, partial_out: torch.Tensor, partial_lse: torch.Tensor,
                   max_model_len: int, num_sms: int, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None) -> torch.Tensor:
    """Split-KV decode; the split count depends only on the batch size (so it is fixed per captured
    graph) and is computed here, from q's shape. num_sms 0: unknown (CPU)."""
    from myvllm.kernels.triton_decode_attention import decode_attention, default_num_splits

    splits = default_num_splits(max_model_len, k_cache.shape[1], batch_size=q.shape[0],
                                num_kv_heads=k_cache.shape[2], num_sms=num_sms or None)
    out = torch.empty_like(q)
    decode_attention(q, k_cache, v_cache, out, seq_lens, block_tables, scale, partial_out, partial_lse, splits,
                     k_scale, v_scale)
    return out


def _triton_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                    scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    from myvllm.kernels.triton_prefill_attention import prefill_attention

    out = torch.empty_like(q)
    prefill_attention(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, max_query_len, scale,
                      k_scale, v_scale)
    return out


triton_store_kv = OpaqueOp("triton_store_kv", _triton_store_kv, _store_fake, ("k_cache", "v_cache"))
# The split-KV workspace is scratch whose contents no other op reads: it is not declared as
# written, so that the compiler neither copies it nor orders anything around it.
triton_decode = OpaqueOp("triton_decode", _triton_decode, _attention_fake)
triton_prefill = OpaqueOp("triton_prefill", _triton_prefill, _attention_fake)


# ---- flash-attn -----------------------------------------------------------------------------

def _flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence: flash_attn_with_kvcache over the paged cache (q [B, 1, H, D])."""
    from flash_attn import flash_attn_with_kvcache

    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens,
                                  block_table=block_tables, softmax_scale=scale, causal=True)
    return out.squeeze(1)


def _flash_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  block_tables: torch.Tensor) -> torch.Tensor:
    """Prefill, chunks, prefix hits and mixed steps: causal varlen attention over the paged cache
    (flash-attn aligns the causal mask to the end of each sequence's keys)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=scale,
                                  causal=True, block_table=block_tables)


flash_decode = OpaqueOp("flash_decode", _flash_decode, _attention_fake)
flash_varlen = OpaqueOp("flash_varlen", _flash_varlen, _attention_fake)
