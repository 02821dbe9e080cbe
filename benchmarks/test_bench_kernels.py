"""Timings of the CUDA kernels against the torch reference, compiled and eager.

Each op runs at Qwen3-0.6B shapes (hidden 1024, 16/8 heads of 128, intermediate 3072,
bf16) for T in {1, 64, 256, 4096} tokens, in two modes:
- graph: CALLS_PER_GRAPH calls captured in one CUDA graph, replayed and synchronised; the
  time per call is the GPU time alone, as in the engine's graph-captured decode steps;
- eager: one call then torch.cuda.synchronize(); includes the host's launch overhead.

Run on a CUDA machine with `pytest -m gpu benchmarks/test_bench_kernels.py`; compare within
a group (`--benchmark-group-by=group`, the default here). `extra_info` holds the time per
call (us_per_call) and the achieved memory bandwidth (gb_per_s).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from capture_util import capture

from myvllm.kernels import reference
from myvllm.kernels.cuda.build import load_cuda_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 1024, 16, 8, 128, 3072
MAX_POSITION, THETA, EPS = 40960, 1e6, 1e-6
DTYPE = torch.bfloat16
TOKENS = [1, 64, 256, 4096]
OPS = ["rms_norm", "fused_add_rms_norm", "qk_norm_rope", "silu_and_mul"]
IMPLS = ["cuda", "compiled", "eager"]
CALLS_PER_GRAPH = 20
ROUNDS = 100


def make_args(op: str, num_tokens: int) -> tuple:
    """Fresh inputs for one op, laid out as the model has them."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda").to(DTYPE)

    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DTYPE)
    if op == "rms_norm":
        return randn(num_tokens, HIDDEN), weight, EPS
    if op == "fused_add_rms_norm":
        return randn(num_tokens, HIDDEN), randn(num_tokens, HIDDEN), weight, EPS
    if op == "qk_norm_rope":
        qkv = randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
        q = qkv[:, : NUM_HEADS * HEAD_DIM].view(num_tokens, NUM_HEADS, HEAD_DIM)
        k = qkv[:, NUM_HEADS * HEAD_DIM : (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM]
        k = k.view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
        head_weight = (1 + 0.1 * torch.randn(HEAD_DIM, device="cuda")).to(DTYPE)
        positions = torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda")
        cache = reference.rotary_cos_sin_cache(HEAD_DIM, MAX_POSITION, THETA, DTYPE, device="cuda")
        return q, k, head_weight, head_weight.clone(), EPS, positions, cache
    if op == "silu_and_mul":
        return (randn(num_tokens, 2 * INTERMEDIATE),)
    raise ValueError(op)


def traffic_bytes(op: str, num_tokens: int) -> int:
    """The bytes an ideal kernel reads and writes (weights and positions left out)."""
    e = torch.finfo(DTYPE).bits // 8
    if op == "rms_norm":
        return 2 * num_tokens * HIDDEN * e
    if op == "fused_add_rms_norm":
        return 4 * num_tokens * HIDDEN * e
    if op == "qk_norm_rope":  # q and k in and out, plus one cache row per token
        return (2 * (NUM_HEADS + NUM_KV_HEADS) + 1) * num_tokens * HEAD_DIM * e
    return 3 * num_tokens * INTERMEDIATE * e


@pytest.fixture(scope="module")
def compiled_reference() -> dict[str, Callable]:
    return {op: torch.compile(getattr(reference, op), dynamic=False) for op in OPS}


@pytest.fixture(scope="module")
def cuda_kernels() -> None:
    if not load_cuda_ops():
        pytest.fail("the CUDA kernels failed to build; see the INFO log")


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("op", OPS)
def test_bench(
    benchmark,
    cuda_kernels: None,
    compiled_reference: dict[str, Callable],
    op: str,
    num_tokens: int,
    impl: str,
    mode: str,
) -> None:
    if impl == "cuda":
        fn = getattr(torch.ops.myvllm, op).default
    elif impl == "compiled":
        fn = compiled_reference[op]
    else:
        fn = getattr(reference, op)
    args = make_args(op, num_tokens)
    for _ in range(3):  # torch.compile traces and tunes here, outside the timings
        fn(*args)
    torch.cuda.synchronize()

    if mode == "graph":
        graph = capture(lambda: fn(*args), CALLS_PER_GRAPH)
        calls = CALLS_PER_GRAPH

        def run() -> None:
            graph.replay()
            torch.cuda.synchronize()

    else:
        calls = 1

        def run() -> None:
            fn(*args)
            torch.cuda.synchronize()

    benchmark.group = f"{op} T={num_tokens} {mode}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=5)
    seconds_per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["us_per_call"] = round(seconds_per_call * 1e6, 2)
    benchmark.extra_info["gb_per_s"] = round(traffic_bytes(op, num_tokens) / seconds_per_call / 1e9, 1)
