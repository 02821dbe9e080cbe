"""The matrix-vector kernels (torch.ops.myvllm.gemv / add_norm_gemv) against the torch reference.

FusedOps.linear / norm_linear / add_norm_linear send up to gemv_max_rows tokens to the CUDA
kernel (GEMV_ROWS by default; here the kernel's limit, GEMV_MAX_ROWS); each must equal the
reference composition (rms_norm or fused_add_rms_norm, F.linear, silu_and_mul) to within the
summation order of the dot products. Tests marked `gpu` need CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from capture_util import capture_outputs
from test_cuda_kernels import EPS, assert_matches, norm_weight, poison_allocator

from myvllm.kernels import reference
from myvllm.kernels.fused_ops import GEMV_MAX_ROWS, GEMV_ROWS, FusedOps, gemv_fits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [1, 2, 3, 5, 8]
# (K, N) of the Qwen3-0.6B projections (qkv, o, gate_up, down) and a wider model's qkv.
SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024),
          "qkv_8b": (4096, 6144)}


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    fused = FusedOps(use_cuda_kernels=True, device="cuda", gemv_max_rows=GEMV_MAX_ROWS)
    assert fused.uses_cuda_kernels, "the CUDA kernels failed to build; see the INFO log"
    return fused


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_weight(k: int, n: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    return (torch.randn(n, k, device=device) / k**0.5).to(dtype)


def staged_bytes_fit(rows: int, k: int, dtype: torch.dtype) -> bool:
    return gemv_fits(torch.empty(rows, k, dtype=dtype), torch.empty(8, k, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_linear(ops: FusedOps, rows: int, shape: str, dtype: torch.dtype) -> None:
    k, n = SHAPES[shape]
    if not staged_bytes_fit(rows, k, dtype):
        pytest.skip("past the kernel's staging buffer: cuBLAS path")
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
    if not staged_bytes_fit(rows, k, dtype):
        pytest.skip("past the kernel's staging buffer: cuBLAS path")
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
    if not staged_bytes_fit(rows, k, dtype):
        pytest.skip("past the kernel's staging buffer: cuBLAS path")
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
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_many_blocks_write_every_output(ops: FusedOps, rows: int) -> None:
    """N not a multiple of the block's 8 outputs, K not a multiple of a warp's 256-element sweep.
    At one and two rows this is the staged form (gemv_staged.cuh), whose last block has fewer
    columns than the others on a 132-SM GPU; at three, the register form."""
    dtype, k, n = torch.bfloat16, 1000, 1003
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
    default = FusedOps(use_cuda_kernels=True, device="cuda")  # the kernel up to GEMV_ROWS tokens
    for rows in (GEMV_ROWS, GEMV_ROWS + 1):
        x = torch.randn(rows, 1024, device="cuda").to(dtype)
        kernel = torch.ops.myvllm.gemv(x, w, None, 0.0, False)
        assert torch.equal(default.linear(x, w), kernel if rows <= GEMV_ROWS else F.linear(x, w))


# Each op's own argument checks (TORCH_CHECK) should raise RuntimeError. FusedOps never calls
# the ops outside their contract (gemv_fits), so the engine does not reach these checks.
BAD_CALLS = {
    "gemv_rows": "x = torch.randn(9, 1024, device='cuda', dtype=torch.bfloat16)\n"
                 "torch.ops.myvllm.gemv(x, torch.randn(512, 1024, device='cuda', dtype=x.dtype), None, 0.0, False)",
    "rms_norm_weight": "torch.ops.myvllm.rms_norm(torch.randn(2, 64, device='cuda'), "
                       "torch.ones(32, device='cuda'), 1e-6)",
}
CHILD = """
import torch
from myvllm.kernels.cuda.build import load_cuda_ops
assert load_cuda_ops()
try:
{call}
except RuntimeError as exc:
    print("RuntimeError:", exc)
"""


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="a failed TORCH_CHECK in the extension's ops ends the process with "
                   "SIGSEGV instead of raising (seen on the H200 with torch 2.11 + CUDA 13, every op tried)")
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_failed_op_checks_raise(case: str) -> None:
    """In a child process, so that a crash fails this test alone."""
    import subprocess
    import sys

    call = "\n".join("    " + line for line in BAD_CALLS[case].splitlines())
    child = subprocess.run([sys.executable, "-c", CHILD.format(call=call)], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert "RuntimeError:" in child.stdout


@pytest.mark.gpu
def test_gemv_replays_in_cuda_graph(ops: FusedOps) -> None:
    dtype, rows = torch.bfloat16, 4
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
    x, residual = torch.randn(3, 1024, device="cuda").to(dtype), torch.randn(3, 1024, device="cuda").to(dtype)
    nw, w = norm_weight(1024, dtype), make_weight(1024, 512, dtype)
    my = torch.ops.myvllm
    torch.library.opcheck(my.gemv.default, (x, w, None, 0.0, False))
    torch.library.opcheck(my.gemv.default, (x, w, nw, EPS, True))
    torch.library.opcheck(my.add_norm_gemv.default, (x, residual, w, nw, EPS, True))


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
    [(1, 1024, torch.bfloat16, True), (8, 3072, torch.bfloat16, True), (9, 1024, torch.bfloat16, False),
     (0, 1024, torch.bfloat16, False), (2, 1001, torch.bfloat16, False), (8, 3072, torch.float32, True),
     (5, 4096, torch.float32, False), (4, 4096, torch.float32, True)],
)
def test_gemv_fits(rows: int, k: int, dtype: torch.dtype, fits: bool) -> None:
    x = torch.empty(rows, k, dtype=dtype)
    assert gemv_fits(x, torch.empty(16, k, dtype=dtype)) is fits
    assert not gemv_fits(x, torch.empty(16, k, dtype=torch.float16 if dtype != torch.float16 else torch.float32))
