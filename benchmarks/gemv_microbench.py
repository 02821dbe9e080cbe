"""Microbenchmark of the decode projections at a few tokens: the matrix-vector CUDA kernel
(norm, residual add and SiLU fused in) against the norm kernel + cuBLAS (+ SiLU kernel).

Each case runs the projection over the weights of all 28 layers of Qwen3-0.6B (880 MB, so
nothing is served from the 50 MB L2), captured in one CUDA graph; times are medians of
replays divided by 28, bandwidth counts the weight bytes.

    python benchmarks/gemv_microbench.py [--rows 1,2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # capture_util

from capture_util import capture  # noqa: E402

from myvllm.kernels.cuda.build import load_cuda_ops  # noqa: E402

LAYERS = 28
HIDDEN, INTER, QKV, VOCAB = 1024, 3072, (16 + 2 * 8) * 128, 151936
DTYPE = torch.bfloat16
EPS = 1e-6


def make_layers() -> list[dict[str, torch.Tensor]]:
    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device="cuda") / k**0.5).to(DTYPE)

    lm_head = w(VOCAB, HIDDEN)  # one for all "layers": 311 MB, far past the L2 too
    return [dict(qkv=w(QKV, HIDDEN), o=w(HIDDEN, 16 * 128), gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER),
                 norm=(1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DTYPE), lm_head=lm_head)
            for _ in range(LAYERS)]


class Kernel:
    """The projections as the matrix-vector kernel computes them (norm, add and SiLU fused in)."""

    @staticmethod
    def linear(x, w):
        return torch.ops.myvllm.gemv(x, w, None, 0.0, False)

    @staticmethod
    def add_norm_linear(x, residual, norm_w, w, silu=False):
        return torch.ops.myvllm.add_norm_gemv(x, residual, w, norm_w, EPS, silu)


class Baseline:
    """The same projections as the norm kernel, cuBLAS and the SiLU kernel."""

    @staticmethod
    def linear(x, w):
        return F.linear(x, w)

    @staticmethod
    def add_norm_linear(x, residual, norm_w, w, silu=False):
        hidden, residual = torch.ops.myvllm.fused_add_rms_norm(x, residual, norm_w, EPS)
        out = F.linear(hidden, w)
        return (torch.ops.myvllm.silu_and_mul(out) if silu else out), residual


def cases(ops, rows: int):
    """name -> (fn(layer) running that projection with its fused neighbours, weight names)."""
    hidden = torch.randn(rows, HIDDEN, device="cuda").to(DTYPE)
    residual = torch.randn(rows, HIDDEN, device="cuda").to(DTYPE)
    attn = torch.randn(rows, 16 * 128, device="cuda").to(DTYPE)
    act = torch.randn(rows, INTER, device="cuda").to(DTYPE)

    def layer(lw):  # the four projections of a decoder layer, without attention
        qkv, res = ops.add_norm_linear(hidden, residual, lw["norm"], lw["qkv"])
        h = ops.linear(attn, lw["o"])
        a, res = ops.add_norm_linear(h, res, lw["norm"], lw["gate_up"], silu=True)
        return ops.linear(a, lw["down"]), res

    return {
        "add+norm+qkv": (lambda lw: ops.add_norm_linear(hidden, residual, lw["norm"], lw["qkv"]), ["qkv"]),
        "o": (lambda lw: ops.linear(attn, lw["o"]), ["o"]),
        "add+norm+gate_up+silu": (
            lambda lw: ops.add_norm_linear(hidden, residual, lw["norm"], lw["gate_up"], silu=True), ["gate_up"]),
        "down": (lambda lw: ops.linear(act, lw["down"]), ["down"]),
        "layer (4 projections)": (layer, ["qkv", "o", "gate_up", "down"]),
        "add+norm+LM head": (lambda lw: ops.add_norm_linear(hidden, residual, lw["norm"], lw["lm_head"]),
                             ["lm_head"]),
    }


def time_case(fn, weights: list[str], layers) -> tuple[float, float]:
    """(µs per layer, TB/s of weights)."""
    def run_all() -> None:
        for lw in layers:
            fn(lw)

    graph = capture(run_all)
    ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
    us = ms * 1e3 / LAYERS
    nbytes = sum(layers[0][w].numel() * layers[0][w].element_size() for w in weights)
    return us, nbytes / (us * 1e-6) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2", help="tokens (the kernel takes one or two)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    layers = make_layers()
    assert load_cuda_ops(), "the CUDA kernels did not build"
    results = []
    print(f"{'rows':>4} {'projection':<24} {'gemv µs':>8} {'TB/s':>5} {'cuBLAS µs':>9} {'TB/s':>5} {'speed-up':>8}")
    for rows in (int(r) for r in args.rows.split(",")):
        new_cases, old_cases = cases(Kernel, rows), cases(Baseline, rows)
        for name, (fn, weights) in new_cases.items():
            us, tbs = time_case(fn, weights, layers)
            base_us, base_tbs = time_case(old_cases[name][0], weights, layers)
            results.append(dict(rows=rows, case=name, gemv_us=us, gemv_tb_s=tbs, cublas_us=base_us,
                                cublas_tb_s=base_tbs))
            print(f"{rows:>4} {name:<24} {us:8.2f} {tbs:5.2f} {base_us:9.2f} {base_tbs:5.2f} {base_us / us:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=torch.cuda.get_device_name(), results=results), indent=2))


if __name__ == "__main__":
    main()
