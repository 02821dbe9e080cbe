"""The matrix-vector kernels (torch.ops.myvllm.gemv / add_norm_gemv) against the torch reference.

FusedOps.linear / norm_linear / add_norm_linear send up to GEMV_MAX_ROWS tokens whose operands
fit the kernel (gemv_fits) to it; each must equal the reference composition (rms_norm or
fused_add_rms_norm, F.linear, silu_and_mul) to within the summation order of the dot products.
Tests marked `gpu` need CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture_util import capture_outputs
from test_cuda_kernels import EPS, OPCHECK_UTILS, assert_matches, norm_weight, poison_allocator

from myvllm.kernels import reference
from myvllm.kernels.cuda.support import GEMV_MAX_ROWS, gemv_fits
from myvllm.kernels.fused_ops import FusedOps

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROWS = list(range(1, GEMV_MAX_ROWS + 1))
# (K, N) of the Qwen3-0.6B projections (qkv, o, gate_up, down) and a wider model's qkv.
SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024),
          "qkv_8b": (4096, 6144)}


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    fused = FusedOps(use_cuda_kernels=True, device="cuda")
    assert fused.uses_cuda_kernels, "the CUDA kernels failed to build; see the INFO log"
    return fused


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_weight(k: int, n: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    return (torch.randn(n, k, device=device) / k**0.5).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_linear(ops: FusedOps, rows: int, shape: str, dtype: torch.dtype) -> None:
    k, n = SHAPES[shape]
    x = torch.randn(rows, k, device="cuda").to(dtype)
    w = make_weight(k, n, dtype)
    poison_allocator(((rows, n), dtype))
    out = torch.ops.myvllm.gemv(x, w, None, 0.0, False)
    assert_matches(out, F.linear(x, w))
    assert torch.equal(ops.linear(x, w), out)  # FusedOps sends these sizes to the kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape", ["qkv", "gate_up", "qkv_8b"], ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_norm_linear(ops: FusedOps, rows: int, shape: str, silu: bool, dtype: torch.dtype) -> None:
    k, n = SHAPES[shape]
    x = (3 * torch.randn(rows, k, device="cuda")).to(dtype)
    nw, w = norm_weight(k, dtype), make_weight(k, n, dtype)
    x_before = x.clone()
    poison_allocator(((rows, n // 2 if silu else n), dtype))
    out = torch.ops.myvllm.gemv(x, w, nw, EPS, silu)
    assert_matches(out, reference.norm_linear(x, nw, EPS, w, silu))
    assert torch.equal(ops.norm_linear(x, nw, EPS, w, silu), out)
    assert torch.equal(x, x_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape", ["qkv", "gate_up", "qkv_8b"], ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_add_norm_linear(ops: FusedOps, rows: int, shape: str, silu: bool, dtype: torch.dtype) -> None:
    k, n = SHAPES[shape]
    x = (3 * torch.randn(rows, k, device="cuda")).to(dtype)
    residual = (10 * torch.randn(rows, k, device="cuda")).to(dtype)
    nw, w = norm_weight(k, dtype), make_weight(k, n, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    poison_allocator(((rows, n // 2 if silu else n), dtype), ((rows, k), dtype))
    out, new_residual = torch.ops.myvllm.add_norm_gemv(x, residual, w, nw, EPS, silu)
    ref_out, ref_residual = reference.add_norm_linear(x, residual, nw, EPS, w, silu)
    assert torch.equal(new_residual, ref_residual)  # one rounded add: bit-exact
    assert_matches(out, ref_out)
    got, got_residual = ops.add_norm_linear(x, residual, nw, EPS, w, silu)
    assert torch.equal(got, out) and torch.equal(got_residual, new_residual)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1003, 30011], ids=["staged", "register"])
@pytest.mark.parametrize("rows", ROWS)
def test_many_blocks_write_every_output(ops: FusedOps, rows: int, n: int) -> None:
    """N not a multiple of the block's 8 outputs, K not a multiple of a warp's 256-element sweep.
    With 1,003 outputs a block's share of W fits in shared memory: the staged form
    (gemv_staged.cuh), whose last block has fewer columns than the others; with 30,011 it does
    not (on GPUs of up to 268 SMs): the register form (gemv_kernel), many columns per block."""
    dtype, k = torch.bfloat16, 1000
    x = torch.randn(rows, k, device="cuda").to(dtype)
    residual = torch.randn(rows, k, device="cuda").to(dtype)
    nw, w = norm_weight(k, dtype), make_weight(k, 2 * n, dtype)
    poison_allocator(((rows, 2 * n), dtype), ((rows, n), dtype), ((rows, k), dtype))
    assert_matches(torch.ops.myvllm.gemv(x, w, None, 0.0, False), F.linear(x, w))
    out, res = torch.ops.myvllm.add_norm_gemv(x, residual, w, nw, EPS, True)
    ref_out, ref_res = reference.add_norm_linear(x, residual, nw, EPS, w, True)
    assert_matches(out, ref_out)
    assert torch.equal(res, ref_res)


@pytest.mark.gpu
def test_other_sizes_take_the_cublas_path(ops: FusedOps) -> None:
    dtype = torch.bfloat16
    w = make_weight(1024, 512, dtype)
    many = torch.randn(GEMV_MAX_ROWS + 1, 1024, device="cuda").to(dtype)
    assert not gemv_fits(many, w)
    assert torch.equal(ops.linear(many, w), F.linear(many, w))
    odd = torch.randn(2, 1001, device="cuda").to(dtype)  # rows not 16-byte multiples
    w_odd = make_weight(1001, 512, dtype)
    assert not gemv_fits(odd, w_odd)
    assert torch.equal(ops.linear(odd, w_odd), F.linear(odd, w_odd))
    nw = norm_weight(1024, dtype)
    got, got_residual = ops.add_norm_linear(many, many, nw, EPS, w, silu=True)
    want, want_residual = reference.add_norm_linear(many, many, nw, EPS, w, silu=True)
    assert_matches(got, want)
    assert torch.equal(got_residual, want_residual)


@pytest.mark.gpu
def test_gemv_replays_in_cuda_graph(ops: FusedOps) -> None:
    dtype, rows = torch.bfloat16, GEMV_MAX_ROWS
    static = [torch.randn(rows, 1024, device="cuda").to(dtype), torch.randn(rows, 1024, device="cuda").to(dtype)]
    nw, w_gate_up, w_down = norm_weight(1024, dtype), make_weight(1024, 6144, dtype), make_weight(3072, 1024, dtype)

    def step(x, residual):
        act, residual = ops.add_norm_linear(x, residual, nw, EPS, w_gate_up, silu=True)
        return ops.linear(act, w_down), residual

    graph, outs = capture_outputs(lambda: step(*static))
    reference_ops = FusedOps(False, "cuda")
    for _ in range(2):
        fresh = [torch.randn_like(t) for t in static]
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        act, ref_residual = reference_ops.add_norm_linear(fresh[0], fresh[1], nw, EPS, w_gate_up, silu=True)
        assert torch.equal(outs[1], ref_residual)
        assert_matches(outs[0], reference_ops.linear(act, w_down))


@pytest.mark.gpu
def test_opcheck(ops: FusedOps) -> None:
    dtype = torch.bfloat16
    x = torch.randn(GEMV_MAX_ROWS, 1024, device="cuda").to(dtype)
    residual = torch.randn(GEMV_MAX_ROWS, 1024, device="cuda").to(dtype)
    nw, w = norm_weight(1024, dtype), make_weight(1024, 512, dtype)
    my = torch.ops.myvllm
    torch.library.opcheck(my.gemv.default, (x, w, None, 0.0, False), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(my.gemv.default, (x, w, nw, EPS, True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(my.add_norm_gemv.default, (x, residual, w, nw, EPS, True), test_utils=OPCHECK_UTILS)


# --------------------------------------------------------------------------- CPU (CI)


def test_projections_on_cpu_are_the_reference() -> None:
    fused = FusedOps(use_cuda_kernels=True, device="cpu")
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    nw, w = 1 + 0.1 * torch.randn(64), make_weight(64, 96, torch.float32, "cpu")
    assert torch.equal(fused.linear(x, w), F.linear(x, w))
    for silu in (False, True):
        assert torch.equal(fused.norm_linear(x, nw, EPS, w, silu), reference.norm_linear(x, nw, EPS, w, silu))
        got = fused.add_norm_linear(x, residual, nw, EPS, w, silu)
        want = reference.add_norm_linear(x, residual, nw, EPS, w, silu)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(reference.norm_linear(x, nw, EPS, w, True),
                       reference.silu_and_mul(F.linear(reference.rms_norm(x, nw, EPS), w)))


@pytest.mark.parametrize(
    ("rows", "k", "dtype", "fits"),
    [(1, 1024, torch.bfloat16, True), (2, 3072, torch.bfloat16, True), (3, 1024, torch.bfloat16, False),
     (0, 1024, torch.bfloat16, False), (2, 1001, torch.bfloat16, False), (2, 12288, torch.float32, True),
     (2, 12800, torch.float32, False), (1, 24576, torch.float32, True), (1, 1024, torch.float64, False)],
)
def test_gemv_fits(rows: int, k: int, dtype: torch.dtype, fits: bool) -> None:
    x = torch.empty(rows, k, dtype=dtype)
    assert gemv_fits(x, torch.empty(16, k, dtype=dtype)) is fits
    assert not gemv_fits(x, torch.empty(16, k, dtype=torch.float16 if dtype != torch.float16 else torch.float32))


def test_gemv_fits_checks_every_operand() -> None:
    x, w = torch.empty(2, 64), torch.empty(16, 64)
    assert gemv_fits(x, w, True, torch.empty(64), torch.empty(2, 64))
    assert not gemv_fits(x, torch.empty(15, 64), silu=True)  # gate and up halves need an even count
    assert not gemv_fits(x, torch.empty(64, 16).t())  # a transposed (non-contiguous) weight
    assert not gemv_fits(x, torch.empty(16, 32))  # K differs
    assert not gemv_fits(x, w, False, torch.empty(32))  # norm weight of the wrong size
    assert not gemv_fits(x, w, False, torch.empty(64, dtype=torch.float16))
    assert not gemv_fits(x, w, False, torch.empty(64), torch.empty(1, 64))  # residual of the wrong shape
    assert not gemv_fits(x, w, False, torch.empty(64), torch.empty(2, 65)[:, 1:])  # misaligned residual rows
    assert not gemv_fits(torch.empty(2, 65)[:, 1:], w)  # misaligned x
