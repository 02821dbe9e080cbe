"""The CUDA ops declare what they support, and what they do not support takes the torch reference.

kernels/cuda/support.py states each op's contract; `FusedOps.supports` checks it before an op
is chosen and logs each refusal once; the attention layer decides when the model is built
whether the fused q/k norm + rotary + KV-store op writes the cache. The unmarked tests check
those decisions on CPU; the tests marked `gpu` run every op over a matrix of head dims and
hidden sizes, eagerly and replayed from CUDA graphs, against myvllm/kernels/reference.py, and
start the engine on a checkpoint whose head_dim (32) the q/k kernel does not take.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from capture_util import capture_outputs
from test_cuda_kernels import EPS, assert_matches, make_cache, make_positions, norm_weight

from myvllm.kernels import fused_ops, reference
from myvllm.kernels.cuda import support
from myvllm.kernels.cuda.support import GEMV_MAX_ROWS
from myvllm.kernels.fused_ops import FusedOps

HEAD_DIMS = [32, 64, 128, 256]
HIDDEN_SIZES = [256, 1024, 2560, 4096, 5120]
BF16, F32 = torch.bfloat16, torch.float32


def forced_kernels() -> FusedOps:
    """A CPU FusedOps that believes the kernels are loaded: for decisions only, never for ops."""
    ops = FusedOps(use_cuda_kernels=False, device="cpu")
    ops.uses_cuda_kernels = True
    return ops


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fused_ops.__name__]


# --------------------------------------------------------------------------- contracts (CPU)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_qk_ops_take_their_head_dims(head_dim: int) -> None:
    reason = support.qk_norm_rope(head_dim, (BF16, BF16), F32)
    assert (reason is None) == (head_dim != 32)
    if reason is not None:
        assert "head_dim 32" in reason and "[64, 128, 256]" in reason


def test_contracts_name_what_they_refuse() -> None:
    assert "mixed dtypes" in support.qk_norm_rope(128, (BF16, torch.float16), F32)
    assert "cos_sin_cache dtype" in support.qk_norm_rope(128, (BF16, BF16), torch.float16)
    assert support.qk_norm_rope(128, (torch.float16,) * 3, torch.float16) is None
    assert "torch.float64" in support.qk_norm_rope(128, (torch.float64,), F32)
    for hidden in HIDDEN_SIZES + [support.NORM_MAX_HIDDEN]:
        assert support.rms_norm(hidden, (BF16, BF16)) is None
    assert "hidden size 8193" in support.rms_norm(8193, (BF16, BF16))
    assert "mixed dtypes" in support.rms_norm(1024, (BF16, F32))
    assert support.silu_and_mul(6144, BF16) is None
    assert "width 6143" in support.silu_and_mul(6143, BF16)
    assert set(support.CHECKS) == {"rms_norm", "fused_add_rms_norm", "qk_norm_rope", "qk_norm_rope_store",
                                   "silu_and_mul"}


def test_a_refusal_is_logged_once_naming_the_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=fused_ops.__name__)
    ops = forced_kernels()
    for _ in range(3):
        assert not ops.supports("qk_norm_rope_store", 32, (BF16,), F32)
        assert not ops.supports("qk_norm_rope_store", 32, (BF16, BF16), F32)  # another key, same reason
    assert ops.supports("qk_norm_rope_store", 128, (BF16,), F32)
    assert refusals(caplog) == ["qk_norm_rope_store: CUDA kernel not used (head_dim 32 not in [64, 128, 256]); "
                                "running the torch reference instead"]


def test_without_kernels_nothing_is_used_and_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=fused_ops.__name__)
    ops = FusedOps(use_cuda_kernels=True, device="cpu")
    assert not ops.uses_cuda_kernels
    assert not ops.supports("rms_norm", 1024, (BF16, BF16))
    assert not ops.supports("qk_norm_rope", 128, (BF16,), F32)
    assert refusals(caplog) == []


def model_config(head_dim: int):
    from myvllm.config import ModelConfig

    return ModelConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_the_model_decides_the_kv_store_when_built(head_dim: int, caplog: pytest.LogCaptureFixture) -> None:
    """Every attention layer lets the fused op write K/V exactly when it takes the head_dim; a
    refusal is logged once for the whole model, at build time."""
    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.models.qwen3_opt import Qwen3ForCausalLM

    caplog.set_level(logging.INFO, logger=fused_ops.__name__)
    model = Qwen3ForCausalLM(model_config(head_dim), 64, TorchAttentionBackend(), forced_kernels())
    layers = model.attention_layers()
    assert len(layers) == 4 and all(a.fused_kv_store == (head_dim != 32) for a in layers)
    expected = ["qk_norm_rope_store: CUDA kernel not used (head_dim 32 not in [64, 128, 256]); running the torch "
                "reference instead"] if head_dim == 32 else []
    assert refusals(caplog) == expected


def test_without_the_fused_op_the_backend_stores_kv() -> None:
    """The attention layer's other path: q/k op, then the backend's store_kv, then attention."""
    from myvllm.attention.backend import AttentionMetadata
    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.layers.attention import Attention
    from myvllm.layers.norm import RMSNorm
    from myvllm.layers.rotary import RotaryEmbedding

    calls = []

    class Recording(TorchAttentionBackend):
        def store_kv(self, k, v, k_cache, v_cache, slot_mapping, **scales) -> None:
            calls.append(k.shape)
            super().store_kv(k, v, k_cache, v_cache, slot_mapping, **scales)

    torch.manual_seed(0)
    rotary = RotaryEmbedding(32, 64, 10000.0)
    attn = Attention(4, 2, 32, 32**-0.5, rotary, Recording(), FusedOps(False, "cpu"), F32)
    assert not attn.fused_kv_store
    attn.bind_kv_cache(torch.zeros(2, 1, 2, 16, 2, 32), 0)
    q, k, v = torch.randn(3, 4, 32), torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    q_norm, k_norm = RMSNorm(32, EPS), RMSNorm(32, EPS)
    positions = torch.tensor([0, 1, 2])
    meta = AttentionMetadata(slot_mapping=torch.tensor([16, 17, 18]), block_tables=torch.tensor([[1]]),
                             seq_lens=torch.tensor([3]), query_start_loc=torch.tensor([0, 3]), max_query_len=3,
                             max_seq_len=3, logits_indices=torch.tensor([2]), is_decode_only=False)
    out = attn(q, k, v, positions, q_norm, k_norm, meta)
    assert calls == [(3, 2, 32)]
    q_ref, k_ref = reference.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, EPS, positions, rotary.cos_sin_cache)
    assert torch.equal(attn.k_cache[1, :3], k_ref) and torch.equal(attn.v_cache[1, :3], v)
    assert torch.equal(out, reference.paged_attention(q_ref, attn.k_cache, attn.v_cache, meta.query_start_loc,
                                                      meta.seq_lens, meta.block_tables, 32**-0.5))


# --------------------------------------------------------------------------- shape matrix (GPU)


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    fused = FusedOps(use_cuda_kernels=True, device="cuda")
    assert fused.uses_cuda_kernels, "the CUDA kernels failed to build; see the INFO log"
    return fused


def randn(*shape: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device="cuda")).to(dtype)


def qk_inputs(head_dim: int, dtype: torch.dtype, tokens: int = 7, heads: int = 8, kv_heads: int = 4) -> list:
    """q, k, v as views of a packed qkv, the norm weights, positions, cos/sin, caches and slots."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    caches = [randn(4, 16, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    slots = torch.randperm(64, device="cuda")[:tokens]
    slots[::3] = -1
    return [q, k, v, norm_weight(head_dim, dtype), norm_weight(head_dim, dtype), make_positions(tokens),
            make_cache(head_dim, F32), *caches, slots]


def run_qk_norm_rope(fused: FusedOps, q, k, v, qw, kw, positions, cos_sin, k_cache, v_cache, slots):
    return fused.qk_norm_rope(q, k, qw, kw, EPS, positions, cos_sin)


def run_qk_norm_rope_store(fused: FusedOps, q, k, v, qw, kw, positions, cos_sin, k_cache, v_cache, slots):
    return (*fused.qk_norm_rope_store(q, k, v, qw, kw, EPS, positions, cos_sin, k_cache, v_cache, slots),
            k_cache, v_cache)


def norm_inputs(hidden: int, dtype: torch.dtype, tokens: int) -> list:
    return [randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, scale=10.0),
            norm_weight(hidden, dtype)]


def run_norms(fused: FusedOps, x, residual, w):
    return (fused.rms_norm(x, w, EPS), *fused.fused_add_rms_norm(x, residual, w, EPS))


def projection_inputs(hidden: int, dtype: torch.dtype, tokens: int) -> list:
    """x, residual, the norm weight, a packed [gate; up] weight [2 hidden, hidden] and a down
    weight [hidden, hidden]."""
    return [*norm_inputs(hidden, dtype, tokens), randn(2 * hidden, hidden, dtype=dtype, scale=hidden**-0.5),
            randn(hidden, hidden, dtype=dtype, scale=hidden**-0.5)]


def run_projections(fused: FusedOps, x, residual, norm_w, w_gate_up, w_down):
    act, new_residual = fused.add_norm_linear(x, residual, norm_w, EPS, w_gate_up, silu=True)  # [T, hidden]
    return fused.norm_linear(x, norm_w, EPS, w_gate_up), fused.linear(act, w_down), act, new_residual


def silu_inputs(hidden: int, dtype: torch.dtype, tokens: int) -> list:
    return [randn(tokens, 2 * 3 * hidden, dtype=dtype)]


def run_silu(fused: FusedOps, x):
    return (fused.silu_and_mul(x),)


def check_op(ops: FusedOps, run, make_inputs, mode: str) -> None:
    """run(ops, *inputs) against run(reference ops, *the same inputs), eager or replayed from a graph
    (then with fresh inputs copied into the captured ones)."""
    inputs = make_inputs()
    if mode == "eager":
        fresh = [t.clone() for t in inputs]  # before the op writes into the caches among them
        outs = run(ops, *inputs)
    else:
        graph, outs = capture_outputs(lambda: run(ops, *inputs))
        fresh = make_inputs()
        for static, new in zip(inputs, fresh):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
    for out, ref in zip(outs, run(FusedOps(False, "cuda"), *fresh), strict=True):
        assert_matches(out.contiguous(), ref.contiguous())


MODES = ["eager", "graph"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_qk_norm_rope_over_head_dims(ops: FusedOps, head_dim: int, dtype: torch.dtype, mode: str) -> None:
    assert ops.supports("qk_norm_rope", head_dim, (dtype,) * 4, F32) == (head_dim != 32)
    check_op(ops, run_qk_norm_rope, partial(qk_inputs, head_dim, dtype), mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_qk_norm_rope_store_over_head_dims(ops: FusedOps, head_dim: int, dtype: torch.dtype) -> None:
    """Eager for every head_dim (head_dim 32 on the reference path, which is not graph-safe: the
    attention layer then stores through the backend instead); replayed from a graph where the
    kernel runs."""
    supported = head_dim != 32
    assert ops.supports("qk_norm_rope_store", head_dim, (dtype,) * 7, F32) == supported
    for mode in MODES if supported else ["eager"]:
        check_op(ops, run_qk_norm_rope_store, partial(qk_inputs, head_dim, dtype), mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_norms_over_hidden_sizes(ops: FusedOps, hidden: int, dtype: torch.dtype, mode: str) -> None:
    assert ops.supports("rms_norm", hidden, (dtype, dtype))
    for tokens in (1, 37):
        check_op(ops, run_norms, partial(norm_inputs, hidden, dtype, tokens), mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_silu_and_mul_over_hidden_sizes(ops: FusedOps, hidden: int, dtype: torch.dtype, mode: str) -> None:
    assert ops.supports("silu_and_mul", 6 * hidden, dtype)
    check_op(ops, run_silu, partial(silu_inputs, hidden, dtype, 5), mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_projections_over_hidden_sizes(ops: FusedOps, hidden: int, dtype: torch.dtype, mode: str) -> None:
    """One and two tokens go to the matrix-vector kernel, three to the norm kernel and cuBLAS."""
    for tokens in range(1, GEMV_MAX_ROWS + 2):
        x, residual, norm_w, w_gate_up, w_down = projection_inputs(hidden, dtype, tokens)
        fits = tokens <= GEMV_MAX_ROWS
        assert support.gemv_fits(x, w_gate_up, True, norm_w, residual) == fits
        assert support.gemv_fits(x, w_down) == fits
        check_op(ops, run_projections, partial(projection_inputs, hidden, dtype, tokens), mode)


# --------------------------------------------------------------------------- engine (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_engine_starts_on_head_dim_32_and_matches_transformers(tmp_path_factory, eager: bool) -> None:
    """A valid Qwen3 checkpoint the fused q/k kernel does not take (head_dim 32: hidden 256, four
    layers, 8 heads, 4 KV heads) starts, stores K/V through the backend, and generates
    transformers' greedy tokens (float32)."""
    from tiny_model import build_checkpoint, hf_greedy, load_hf_model

    from myvllm import LLM, SamplingParams

    path = build_checkpoint(str(tmp_path_factory.mktemp("head-dim-32")), num_layers=4, hidden=256, heads=8,
                            kv_heads=4, head_dim=32, intermediate=512, tie=False)
    llm = LLM(path, dtype="float32", kvcache_block_size=16, gpu_memory_utilization=0.3, max_model_len=512,
              max_num_seqs=16, enforce_eager=eager)
    runner = llm.engine.runner
    assert runner.ops.uses_cuda_kernels
    assert not any(a.fused_kv_store for a in runner.model.attention_layers())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 384, (int(n),), generator=g).tolist() for n in torch.randint(2, 200, (12,),
                                                                                          generator=g)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    hf = load_hf_model(path, device="cuda")
    same = sum(o.outputs[0].token_ids == hf_greedy(hf, p, 16)[0] for o, p in zip(outs, prompts))
    assert same >= 0.9 * len(prompts), f"{same}/{len(prompts)} prompts equal transformers' greedy tokens"
