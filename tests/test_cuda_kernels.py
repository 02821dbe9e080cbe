"""The CUDA kernels (torch.ops.myvllm) against the torch reference ops.

Tests marked `gpu` need a CUDA device and are deselected by default; run them with
`pytest -m gpu tests/test_cuda_kernels.py` (the first run compiles the kernels, about a
minute). The unmarked tests check the CPU fallback and run everywhere.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from capture_util import capture_outputs

from myvllm.kernels import reference
from myvllm.kernels.cuda import build
from myvllm.kernels.fused_ops import FusedOps

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOKENS = [1, 7, 256, 4096]
HIDDEN = [1024, 4096, 5120]
INTERMEDIATE = [3072, 12288, 25600]
# (query heads, kv heads, head_dim): Qwen3-0.6B, Qwen3-8B, and a head_dim-64 layout.
HEADS = [(16, 8, 128), (32, 8, 128), (16, 4, 64)]
MAX_POSITION = 40960
THETA = 1e6
EPS = 1e-6

# The ops have no fake (meta) versions (nothing traces them with torch.compile), so opcheck
# checks the schema (aliasing and mutation as the kernels behave) and the autograd registration.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration")

# Elementwise (rtol, atol) and the bound on ||out - ref|| / ||ref||. The kernels round where
# the reference rounds, so bf16/fp16 outputs differ by at most an ulp here and there.
TOLERANCE = {
    torch.bfloat16: (2e-2, 5e-2, 1e-2),
    torch.float16: (2e-3, 5e-3, 1e-2),
    torch.float32: (1e-5, 1e-5, 1e-5),
}


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "output has unwritten (poisoned) or non-finite elements"
    rtol, atol, max_rel = TOLERANCE[ref.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    assert rel < max_rel, f"relative error {rel:.2e}"


def poison_allocator(*like: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leave NaN-filled blocks of the outputs' sizes in the caching allocator.

    The ops allocate their outputs internally; those allocations reuse these freed blocks,
    so any element a kernel fails to write stays NaN and fails `assert_matches`.
    """
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like]
    del blocks


def make_cache(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return reference.rotary_cos_sin_cache(head_dim, MAX_POSITION, THETA, dtype, device="cuda")


def make_positions(num_tokens: int) -> torch.Tensor:
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda")
    positions[-1] = MAX_POSITION - 1
    return positions


def norm_weight(n: int, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(n, device="cuda")).to(dtype)


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    fused = FusedOps(use_cuda_kernels=True, device="cuda")
    assert fused.uses_cuda_kernels, "the CUDA kernels failed to build; see the INFO log"
    return fused


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- norms


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rms_norm(ops: FusedOps, num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(num_tokens, hidden, device="cuda")).to(dtype)
    w = norm_weight(hidden, dtype)
    x_before = x.clone()
    poison_allocator(((num_tokens, hidden), dtype))
    out = ops.rms_norm(x, w, EPS)
    assert_matches(out, reference.rms_norm(x, w, EPS))
    assert torch.equal(x, x_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fused_add_rms_norm(ops: FusedOps, num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(num_tokens, hidden, device="cuda")).to(dtype)
    residual = (10 * torch.randn(num_tokens, hidden, device="cuda")).to(dtype)
    w = norm_weight(hidden, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    poison_allocator(((num_tokens, hidden), dtype), ((num_tokens, hidden), dtype))
    out, new_residual = ops.fused_add_rms_norm(x, residual, w, EPS)
    ref_out, ref_residual = reference.fused_add_rms_norm(x, residual, w, EPS)
    assert torch.equal(new_residual, ref_residual)  # one rounded add: bit-exact
    assert_matches(out, ref_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_on_unaligned_and_strided_rows(ops: FusedOps, dtype: torch.dtype) -> None:
    """Rows that are not 16-byte aligned take the scalar path; leading dims are flattened."""
    hidden = 1027
    base = torch.randn(33, hidden + 5, device="cuda").to(dtype)
    x = base[:, 1 : hidden + 1]  # row stride hidden + 5, start misaligned
    residual = torch.randn(33, hidden, device="cuda").to(dtype)
    w = norm_weight(hidden, dtype)
    assert_matches(ops.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))
    out, res = ops.fused_add_rms_norm(x, residual, w, EPS)
    ref_out, ref_res = reference.fused_add_rms_norm(x, residual, w, EPS)
    assert_matches(out, ref_out)
    assert torch.equal(res, ref_res)
    x3 = torch.randn(3, 5, 2048, device="cuda").to(dtype)
    w3 = norm_weight(2048, dtype)
    assert_matches(ops.rms_norm(x3, w3, EPS), reference.rms_norm(x3, w3, EPS))
    big = torch.randn(2, 32768, device="cuda").to(dtype)  # several vectors per thread
    w_big = norm_weight(32768, dtype)
    assert_matches(ops.rms_norm(big, w_big, EPS), reference.rms_norm(big, w_big, EPS))


@pytest.mark.gpu
def test_norms_on_empty_input(ops: FusedOps) -> None:
    x = torch.empty(0, 1024, device="cuda", dtype=torch.bfloat16)
    w = norm_weight(1024, torch.bfloat16)
    assert ops.rms_norm(x, w, EPS).shape == (0, 1024)
    out, res = ops.fused_add_rms_norm(x, x, w, EPS)
    assert out.shape == res.shape == (0, 1024)


# --------------------------------------------------------------------------- qk norm + rope


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", ["float32", "same"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed_qkv", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_qk_norm_rope(
    ops: FusedOps,
    num_tokens: int,
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    packed: bool,
    cache_dtype: str,
) -> None:
    num_heads, num_kv_heads, head_dim = heads
    if packed:  # q and k as views into the qkv projection output, as the attention layer has them
        width = (num_heads + 2 * num_kv_heads) * head_dim
        qkv = (4 * torch.randn(num_tokens, width, device="cuda")).to(dtype)
        q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
            num_tokens, num_kv_heads, head_dim
        )
        assert num_tokens == 1 or not (q.is_contiguous() or k.is_contiguous())
    else:
        q = (4 * torch.randn(num_tokens, num_heads, head_dim, device="cuda")).to(dtype)
        k = (4 * torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda")).to(dtype)
    q_weight, k_weight = norm_weight(head_dim, dtype), norm_weight(head_dim, dtype)
    cache = make_cache(head_dim, torch.float32 if cache_dtype == "float32" else dtype)
    positions = make_positions(num_tokens)
    q_before, k_before = q.clone(), k.clone()
    poison_allocator((tuple(q.shape), dtype), (tuple(k.shape), dtype))
    q_out, k_out = ops.qk_norm_rope(q, k, q_weight, k_weight, EPS, positions, cache)
    q_ref, k_ref = reference.qk_norm_rope(q, k, q_weight, k_weight, EPS, positions, cache)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_rope_head_dim_256_and_empty(ops: FusedOps, dtype: torch.dtype) -> None:
    q = torch.randn(9, 4, 256, device="cuda").to(dtype)
    k = torch.randn(9, 2, 256, device="cuda").to(dtype)
    qw, kw = norm_weight(256, dtype), norm_weight(256, dtype)
    cache, positions = make_cache(256, dtype), make_positions(9)
    for out, ref in zip(
        ops.qk_norm_rope(q, k, qw, kw, EPS, positions, cache),
        reference.qk_norm_rope(q, k, qw, kw, EPS, positions, cache),
    ):
        assert_matches(out, ref)
    q_out, k_out = ops.qk_norm_rope(q[:0], k[:0], qw, kw, EPS, positions[:0], cache)
    assert q_out.shape == (0, 4, 256) and k_out.shape == (0, 2, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_qk_norm_rope_store(ops: FusedOps, num_tokens: int, heads: tuple[int, int, int], dtype: torch.dtype) -> None:
    """The fused op gives qk_norm_rope's outputs and writes K (normalised, rotated) and V into
    the caches at the slots, skipping slot -1, leaving every other slot untouched."""
    num_heads, num_kv_heads, head_dim = heads
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (4 * torch.randn(num_tokens, width, device="cuda")).to(dtype)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    q_weight, k_weight = norm_weight(head_dim, dtype), norm_weight(head_dim, dtype)
    cache, positions = make_cache(head_dim, torch.float32), make_positions(num_tokens)
    num_blocks, block_size = 2 + num_tokens // 16, 16
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::3] = -1
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                         device="cuda") for _ in range(4)]
    q_out, k_out = ops.qk_norm_rope_store(q, k, v, q_weight, k_weight, EPS, positions, cache, caches[0],
                                          caches[1], slots)
    q_ref, k_ref = reference.qk_norm_rope_store(q, k, v, q_weight, k_weight, EPS, positions, cache, caches[2],
                                                caches[3], slots)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        ours, ref = ours.view(-1, num_kv_heads, head_dim), ref.view(-1, num_kv_heads, head_dim)
        assert ours[~written].isnan().all(), "a slot that was not asked for was written"
        assert_matches(ours[written].contiguous(), ref[written].contiguous())
    torch.library.opcheck(torch.ops.myvllm.qk_norm_rope_store.default,
                          (q, k, v, q_weight, k_weight, EPS, positions, cache, caches[0], caches[1], slots),
                          test_utils=OPCHECK_UTILS)


# --------------------------------------------------------------------------- activation


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", INTERMEDIATE)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul(ops: FusedOps, num_tokens: int, intermediate: int, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(num_tokens, 2 * intermediate, device="cuda")).to(dtype)
    x_before = x.clone()
    poison_allocator(((num_tokens, intermediate), dtype))
    out = ops.silu_and_mul(x)
    assert_matches(out, reference.silu_and_mul(x))
    assert torch.equal(x, x_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_unaligned_and_3d(ops: FusedOps, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(5, 2 * 1001, device="cuda")).to(dtype)  # odd I: scalar path
    assert_matches(ops.silu_and_mul(x), reference.silu_and_mul(x))
    x3 = (3 * torch.randn(2, 3, 2 * 768, device="cuda")).to(dtype)
    assert_matches(ops.silu_and_mul(x3), reference.silu_and_mul(x3))
    assert ops.silu_and_mul(x[:0]).shape == (0, 1001)


# --------------------------------------------------------------------------- graphs


def decoder_step(ops: FusedOps, x, residual, w, qkv, q_weight, k_weight, positions, cache, gate_up):
    """The ops in the order a Qwen3 decoder layer calls them (0.6B layout)."""
    num_heads, num_kv_heads, head_dim = HEADS[0]
    h, residual = ops.fused_add_rms_norm(x, residual, w, EPS)
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    q, k = ops.qk_norm_rope(q, k, q_weight, k_weight, EPS, positions, cache)
    return ops.rms_norm(h, w, EPS), residual, q, k, ops.silu_and_mul(gate_up)


def decoder_inputs(num_tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    num_heads, num_kv_heads, head_dim = HEADS[0]
    hidden, inter = 1024, 3072
    return [
        torch.randn(num_tokens, hidden, device="cuda").to(dtype),
        torch.randn(num_tokens, hidden, device="cuda").to(dtype),
        norm_weight(hidden, dtype),
        torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").to(dtype),
        norm_weight(head_dim, dtype),
        norm_weight(head_dim, dtype),
        make_positions(num_tokens),
        make_cache(head_dim, dtype),
        torch.randn(num_tokens, 2 * inter, device="cuda").to(dtype),
    ]


@pytest.mark.gpu
def test_ops_replay_in_cuda_graph(ops: FusedOps) -> None:
    dtype, num_tokens = torch.bfloat16, 8
    static = decoder_inputs(num_tokens, dtype)
    graph, outs = capture_outputs(lambda: decoder_step(ops, *static))
    for _ in range(2):  # fresh inputs each replay, written into the captured buffers
        fresh = decoder_inputs(num_tokens, dtype)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, decoder_step(FusedOps(False, "cuda"), *fresh)):
            assert_matches(out, ref)


@pytest.mark.gpu
def test_opcheck(ops: FusedOps) -> None:
    """The schemas agree with what the kernels do (no aliasing of inputs, no hidden mutation)."""
    x, residual, w, qkv, qw, kw, positions, cache, gate_up = decoder_inputs(5, torch.bfloat16)
    q = qkv[:, : 16 * 128].view(5, 16, 128)
    k = qkv[:, 16 * 128 : 24 * 128].view(5, 8, 128)
    my = torch.ops.myvllm
    torch.library.opcheck(my.rms_norm.default, (x, w, EPS), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(my.fused_add_rms_norm.default, (x, residual, w, EPS), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(my.qk_norm_rope.default, (q, k, qw, kw, EPS, positions, cache), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(my.silu_and_mul.default, (gate_up,), test_utils=OPCHECK_UTILS)


# Direct calls outside an op's contract (FusedOps never makes them: it checks
# kernels/cuda/support.py first) raise RuntimeError from the op's own check, whose message
# names the op. Each call runs in a child process, so that a regression which ends the process
# fails that case alone. The aten cases are controls: a failed check in torch's own op, with
# and without this extension loaded, shows whether the process can raise C++ errors at all.
CHILD = """
import torch
{load}
x, w = torch.randn(3, 64, device="cuda"), torch.ones(64, device="cuda")
q, k = torch.randn(3, 4, 32, device="cuda"), torch.randn(3, 2, 32, device="cuda")
hw, cos_sin = torch.ones(32, device="cuda"), torch.randn(64, 32, device="cuda")
pos, slots = torch.zeros(3, dtype=torch.long, device="cuda"), torch.arange(3, device="cuda")
kc, vc = torch.zeros(2, 16, 2, 32, device="cuda"), torch.zeros(2, 16, 2, 32, device="cuda")
try:
    {call}
except RuntimeError as exc:
    print("RuntimeError:", exc)
"""
LOAD = "from myvllm.kernels.cuda.build import load_cuda_ops\nassert load_cuda_ops()"
BAD_CALLS = {  # case -> (load the extension, the call, the start of the expected message)
    "rms_norm": (True, "torch.ops.myvllm.rms_norm(x, w[:32], 1e-6)", "rms_norm: weight must be [64]"),
    "fused_add_rms_norm": (True, "torch.ops.myvllm.fused_add_rms_norm(x, x[:1], w, 1e-6)",
                           "fused_add_rms_norm: residual shape"),
    "qk_norm_rope": (True, "torch.ops.myvllm.qk_norm_rope(q, k, hw, hw, 1e-6, pos, cos_sin)",
                     "qk_norm_rope: head_dim 32 not in"),
    "qk_norm_rope_store": (True, "torch.ops.myvllm.qk_norm_rope_store(q, k, k.clone(), hw, hw, 1e-6, pos, cos_sin, "
                                 "kc, vc, slots)", "qk_norm_rope: head_dim 32 not in"),
    "silu_and_mul": (True, "torch.ops.myvllm.silu_and_mul(x[:, :63])", "silu_and_mul: last dim of x must be even"),
    "gemv": (True, "torch.ops.myvllm.gemv(x, torch.randn(16, 64, device='cuda'), None, 0.0, False)",
             "gemv: x must have 1..2 rows, got 3"),
    "add_norm_gemv": (True, "torch.ops.myvllm.add_norm_gemv(x[:2], x, torch.randn(16, 64, device='cuda'), w, 1e-6, "
                            "False)", "add_norm_gemv: residual shape"),
    "aten_with_extension": (True, "x.view(5)", "shape '[5]' is invalid"),
    "aten_without_extension": (False, "x.view(5)", "shape '[5]' is invalid"),
}


def run_child(load: bool, call: str) -> subprocess.CompletedProcess:
    """CHILD with call, in a fresh interpreter that prints a Python traceback if it crashes."""
    script = CHILD.format(load=LOAD if load else "", call=call)
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_failed_op_checks_raise(case: str) -> None:
    load, call, message = BAD_CALLS[case]
    child = run_child(load, call)
    assert child.returncode == 0, f"exit {child.returncode}; stdout: {child.stdout[-1000:]}; {child.stderr[-3000:]}"
    assert f"RuntimeError: {message}" in child.stdout, child.stdout


@pytest.mark.gpu
def test_a_process_using_the_ops_exits_cleanly() -> None:
    """The control for the cases above: valid calls, then a normal exit."""
    child = run_child(True, 'print("ok", torch.ops.myvllm.rms_norm(x, w, 1e-6).shape)')
    assert child.returncode == 0, f"exit {child.returncode}; stdout: {child.stdout[-1000:]}; {child.stderr[-3000:]}"
    assert "ok torch.Size([3, 64])" in child.stdout


@pytest.mark.gpu
def test_fused_ops_on_cuda_without_kernels_uses_reference() -> None:
    fused = FusedOps(use_cuda_kernels=False, device="cuda")
    assert not fused.uses_cuda_kernels
    x = torch.randn(4, 64, device="cuda")
    assert torch.equal(fused.silu_and_mul(x), reference.silu_and_mul(x))


# --------------------------------------------------------------------------- CPU (CI)


def test_fused_ops_on_cpu_fall_back_to_reference() -> None:
    fused = FusedOps(use_cuda_kernels=True, device="cpu")
    assert not fused.uses_cuda_kernels
    assert "reference" in repr(fused)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    w = 1 + 0.1 * torch.randn(64)
    assert torch.equal(fused.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))
    for got, want in zip(
        fused.fused_add_rms_norm(x, residual, w, EPS), reference.fused_add_rms_norm(x, residual, w, EPS)
    ):
        assert torch.equal(got, want)
    qkv = torch.randn(3, (4 + 2 * 2) * 64)
    q, k = qkv[:, : 4 * 64].view(3, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(3, 2, 64)
    qw, kw = 1 + 0.1 * torch.randn(64), 1 + 0.1 * torch.randn(64)
    cache = reference.rotary_cos_sin_cache(64, 128, THETA, torch.float32)
    positions = torch.tensor([0, 5, 127])
    for got, want in zip(
        fused.qk_norm_rope(q, k, qw, kw, EPS, positions, cache),
        reference.qk_norm_rope(q, k, qw, kw, EPS, positions, cache),
    ):
        assert torch.equal(got, want)
    gate_up = torch.randn(3, 2 * 96)
    assert torch.equal(fused.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))


def test_load_cuda_ops_without_cuda_returns_false(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.INFO, logger=build.__name__)
    assert build.load_cuda_ops.__wrapped__() is False  # uncached call
    assert "CUDA kernels not used" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less path")
def test_load_cuda_ops_is_false_and_cached_here() -> None:
    assert build.load_cuda_ops() is False
    assert build.load_cuda_ops() is False


def test_load_cuda_ops_build_failure_returns_false(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_build() -> None:
        raise RuntimeError("Error building extension 'myvllm_cuda_ops'")

    monkeypatch.setattr(build, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "_build_and_load", failing_build)
    caplog.set_level(logging.INFO, logger=build.__name__)
    assert build.load_cuda_ops.__wrapped__() is False
    assert "build failed" in caplog.text and "Error building extension" in caplog.text
