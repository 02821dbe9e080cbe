"""The block-FP8 fused MoE (kernels/triton_fp8_moe.py) against its exact oracle
(kernels/reference_fp8_moe.fused_experts_w8a8: the same per-token-group activation quantization,
float32 block products), on CPU through Triton's interpreter and on CUDA.

Interpreted (tiny shapes): Triton's interpreter converts float32 to fp8 differently from the GPU
(and from torch) at some values, so the activation codes would differ from the oracle's; there
the op runs with the reference quantization in place of the kernel's (the kernel's scales are
compared separately), which checks the grouped GEMMs, the scale indexing, SiLU-mul and the
routing weights to float32 rounding (FP32_TOL).

On CUDA, the whole op (its own quantization kernel) over the expert shapes of Qwen3-30B-A3B
(whole and at TP=2) and Qwen3-235B-A22B (at TP=4, and at TP=8 where a rank's 192 rows straddle
a block: the kernel indexes scales by row, so it runs there though the model refuses such
shards) with 1..8192 tokens, eager and replayed from a CUDA graph with new inputs. Bounds, as
relative Frobenius errors in bf16:
  - EXACT_TOL = 1e-2 against the oracle on the same bf16 inputs: the kernel rounds each
    expert's weighted output to bf16 before the top-k sum (2^-9 relative per element), and
    silu(gate) * up may round to another bf16 value (float32 summation order), moving an
    activation's fp8 code by one step, in a few elements;
  - QUANT_TOL = 0.1 against the unquantized float32 MoE on the dequantized weights: that is
    the two e4m3 roundings of the activations (3 mantissa bits: ~3% each on random data).

    PYTHONPATH=. python3 -m pytest -m gpu -q tests/test_fp8_moe_kernels.py
"""

from __future__ import annotations

import os

import pytest
import torch

from myvllm.kernels import reference_fp8, reference_fp8_moe, reference_moe

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP32_TOL = 1e-5
EXACT_TOL = 1e-2
QUANT_TOL = 0.1
BLOCK = 128
QUANT_CHUNK = 16  # experts quantized at once when making random weights

# (experts, top-k, hidden, intermediate per rank)
A3B = (128, 8, 2048, 768)
A3B_TP2 = (128, 8, 2048, 384)
A22B_TP4 = (128, 8, 4096, 384)
A22B_TP8 = (128, 8, 4096, 192)
GPU_SHAPES = {"30b-a3b": A3B, "30b-a3b-tp2": A3B_TP2, "235b-a22b-tp4": A22B_TP4, "235b-a22b-tp8": A22B_TP8}
GPU_TOKENS = (1, 7, 64, 256, 1024, 8192)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def random_fp8_experts(num_experts: int, n: int, k: int, gen: torch.Generator, device: str):
    """Stacked random experts [E, n, k] ~ N(0, 1 / k), quantized to 128 x 128 blocks."""
    q = torch.empty(num_experts, n, k, dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty(num_experts, -(-n // BLOCK), -(-k // BLOCK), dtype=torch.float32, device=device)
    for start in range(0, num_experts, QUANT_CHUNK):
        w = torch.randn(min(QUANT_CHUNK, num_experts - start), n, k, generator=gen, device=device) * k**-0.5
        q[start:start + QUANT_CHUNK], s[start:start + QUANT_CHUNK] = reference_fp8.quantize_weight(w)
    return q, s


def random_weights(shape, device: str, seed: int = 0):
    num_experts, _, hidden, inter = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    w13, w13_s = random_fp8_experts(num_experts, 2 * inter, hidden, gen, device)
    w2, w2_s = random_fp8_experts(num_experts, hidden, inter, gen, device)
    return w13, w13_s, w2, w2_s


def random_tokens(shape, num_tokens: int, dtype: torch.dtype, device: str, seed: int = 1, skew: float = 0.0):
    """x [T, H] and a routing of random logits (skew > 0 sends most tokens to the first experts)."""
    num_experts, top_k, hidden, _ = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    logits -= skew * torch.arange(num_experts, device=device)
    weights, ids = reference_moe.topk_softmax(logits.to(dtype), top_k, renormalize=True)
    return x, weights, ids


def oracle(x, weights, ids, experts) -> torch.Tensor:
    w13, w13_s, w2, w2_s = experts
    return reference_fp8_moe.fused_experts_w8a8(x, w13, w13_s, w2, w2_s, weights, ids, BLOCK, BLOCK).float()


def unquantized(x, weights, ids, experts) -> torch.Tensor:
    """The float32 MoE on the dequantized weights and unquantized activations."""
    return reference_fp8_moe.fused_experts_dequant(x.float(), *experts, weights.float(), ids, BLOCK, BLOCK)


def run(x, weights, ids, experts, tiles=None) -> torch.Tensor:
    from myvllm.kernels.triton_fp8_moe import fused_experts_fp8

    w13, w13_s, w2, w2_s = experts
    return fused_experts_fp8(x, w13, w13_s, w2, w2_s, weights, ids, BLOCK, BLOCK, tiles)


@pytest.fixture
def reference_quantization(monkeypatch):
    """The op with the reference activation quantization, where the interpreter's fp8 rounding differs."""
    from myvllm.kernels import triton_fp8_moe

    monkeypatch.setattr(triton_fp8_moe, "per_token_group_quant", reference_fp8.per_token_group_quant)


# ---- interpreted, tiny shapes --------------------------------------------------------------------

@pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted")
@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, inter", [
    (1, 8, 2, 256, 128), (7, 8, 2, 192, 256), (33, 4, 4, 128, 128), (40, 8, 2, 320, 384), (20, 6, 2, 128, 192)])
def test_interpreted_matches_oracle(reference_quantization, num_tokens, num_experts, top_k, hidden, inter):
    """Ragged last hidden blocks (192, 320), every expert chosen (top_k == E), a w13 block holding
    gate and up rows (192: the TP=8 split), fewer rows than a tile."""
    shape = (num_experts, top_k, hidden, inter)
    experts = random_weights(shape, "cpu")
    x, weights, ids = random_tokens(shape, num_tokens, torch.float32, "cpu")
    out = run(x, weights, ids, experts)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, oracle(x, weights, ids, experts)) < FP32_TOL
    assert rel_err(out, unquantized(x, weights, ids, experts)) < QUANT_TOL


@pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted")
@pytest.mark.parametrize("num_tokens", [5, 40])
def test_interpreted_every_tile_config_agrees(reference_quantization, num_tokens):
    from myvllm.kernels.triton_fp8_moe import fp8_moe_tiles

    shape = (8, 2, 256, 128)
    experts = random_weights(shape, "cpu", seed=2)
    x, weights, ids = random_tokens(shape, num_tokens, torch.float32, "cpu", seed=3)
    ref = oracle(x, weights, ids, experts)
    tiles = [fp8_moe_tiles(tokens, 2, 8, BLOCK) for tokens in (1, 128, 1024)]
    assert len(set(tiles)) == 3 and all(t.block_k == BLOCK for t in tiles)
    for tile in tiles:
        assert rel_err(run(x, weights, ids, experts, tile), ref) < FP32_TOL


@pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted")
def test_interpreted_activation_scales_are_the_references():
    from myvllm.kernels import triton_fp8_gemm

    x = torch.randn(9, 320, generator=torch.Generator().manual_seed(4))
    assert torch.equal(triton_fp8_gemm.per_token_group_quant(x)[1], reference_fp8.per_token_group_quant(x)[1])


def test_bad_shapes_are_refused():
    from myvllm.kernels.triton_fp8_moe import check_shapes

    shape = (4, 2, 256, 128)
    w13, w13_s, w2, w2_s = random_weights(shape, "cpu")
    x = torch.randn(3, 256)
    check_shapes(x, w13, w13_s, w2, w2_s, BLOCK, BLOCK)
    with pytest.raises(ValueError, match=r"w2_scale has shape \(4, 2, 2\), expected \(4, 2, 1\)"):
        check_shapes(x, w13, w13_s, w2, torch.ones(4, 2, 2), BLOCK, BLOCK)
    with pytest.raises(ValueError, match=r"expert weights must be torch.float8_e4m3fn"):
        check_shapes(x, w13.float(), w13_s, w2, w2_s, BLOCK, BLOCK)


def test_oracle_is_the_product_of_the_quantized_operands():
    """fused_experts_w8a8 == the float32 MoE with x and silu(gate) * up rounded to their fp8
    groups, on the dequantized weights (a second derivation of the oracle)."""
    import torch.nn.functional as F

    shape = (4, 2, 256, 128)
    experts = random_weights(shape, "cpu", seed=5)
    x, weights, ids = random_tokens(shape, 6, torch.float32, "cpu", seed=6)
    w13, w13_s, w2, w2_s = experts
    d13 = reference_fp8.dequantize_weight(w13, w13_s, BLOCK, BLOCK, torch.float32)
    d2 = reference_fp8.dequantize_weight(w2, w2_s, BLOCK, BLOCK, torch.float32)

    def fake_quant(a):
        q, s = reference_fp8.per_token_group_quant(a)
        return q.float() * reference_fp8.expand_blocks(s, *a.shape, 1, BLOCK)

    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = (fake_quant(x[t:t + 1]) @ d13[e].T).chunk(2, dim=-1)
            expected[t] += weights[t, slot] * (fake_quant(F.silu(gate) * up) @ d2[e].T)[0]
    assert rel_err(oracle(x, weights, ids, experts), expected) < FP32_TOL


# ---- CUDA: the published shapes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_experts():
    """Random FP8 experts of each GPU shape, made once per shape."""
    made = {}

    def get(name: str):
        if name not in made:
            made.clear()  # one shape's weights at a time
            made[name] = random_weights(GPU_SHAPES[name], "cuda")
        return made[name]

    return get


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_fp8_moe_bf16_eager_and_graph(gpu_experts, name, num_tokens):
    from capture_util import capture_outputs

    shape = GPU_SHAPES[name]
    experts = gpu_experts(name)
    inputs = random_tokens(shape, num_tokens, torch.bfloat16, "cuda")
    out = run(*inputs, experts)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, oracle(*inputs, experts)) < EXACT_TOL
    assert rel_err(out, unquantized(*inputs, experts)) < QUANT_TOL

    static = [t.clone() for t in inputs]
    graph, graph_out = capture_outputs(lambda: run(*static, experts))
    fresh = random_tokens(shape, num_tokens, torch.bfloat16, "cuda", seed=7, skew=0.05)
    for buf, new in zip(static, fresh):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(graph_out, oracle(*fresh, experts)) < EXACT_TOL


@pytest.mark.gpu
def test_skewed_routing_fp8():
    """Most tokens on a few experts: long expert lists, many empty experts."""
    experts = random_weights(A3B, "cuda")
    inputs = random_tokens(A3B, 2048, torch.bfloat16, "cuda", skew=0.5)
    assert int(inputs[-1].max()) < 64  # the skew really concentrates the routing
    assert rel_err(run(*inputs, experts), oracle(*inputs, experts)) < EXACT_TOL


@pytest.mark.gpu
def test_the_model_picks_the_kernel_on_fp8_gpus():
    from myvllm.layers.quantization.config import Fp8Config
    from myvllm.layers.quantization.fp8_moe import Fp8MoEMethod

    method = Fp8MoEMethod(Fp8Config(), torch.device("cuda"), torch.bfloat16)
    expected = torch.cuda.get_device_capability() >= (8, 9)
    assert method.uses_triton == expected
    assert (method.fused_experts.__module__ == "myvllm.kernels.triton_fp8_moe") == expected
