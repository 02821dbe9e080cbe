"""The decode projections at small batch: cuBLAS (F.linear) against the skinny Triton GEMM.

    python benchmarks/gemm_microbench.py [--json out.json]

Qwen3-0.6B shapes, bf16, times from CUDA-graph replays (20 calls per graph). First a sweep of
skinny-GEMM configurations at M=1 per shape, then the best one against F.linear at M=1..16.
Bandwidth = bytes of W / time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from myvllm.capture.capture_util import capture  # noqa: E402
from myvllm.kernels.triton_skinny_gemm import SkinnyConfig, skinny_linear  # noqa: E402

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
CALLS = 20


def time_us(fn) -> float:
    graph = capture(fn, CALLS)
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3 / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = [SkinnyConfig(block_n=bn, block_k=bk, num_warps=4, num_stages=st)
               for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (3, 5))]
    record = {"sweep": {}, "compare": {}}
    best_configs = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        results = []
        for cfg in configs:
            us = time_us(lambda x=x, w=w, cfg=cfg: skinny_linear(x, w, cfg))
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        best_configs[name] = results[0][1]
        record["sweep"][name] = [(us, vars(cfg)) for us, cfg in results]
        print(f"{name} N={n} K={k}: best {results[0][0]:.2f} us {results[0][1]}, worst {results[-1][0]:.2f} us")
    print(f"{'shape':8s} {'M':>3s} {'cuBLAS us':>10s} {'skinny us':>10s} {'cuBLAS TB/s':>12s} {'skinny TB/s':>12s}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            got = skinny_linear(x, w, best_configs[name]).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < 2e-2, f"{name} M={m}: relative error {err}"
            cfg = best_configs[name]
            t_blas = time_us(lambda x=x, w=w: F.linear(x, w))
            t_skinny = time_us(lambda x=x, w=w, cfg=cfg: skinny_linear(x, w, cfg))
            tb = n * k * 2 / 1e12
            print(f"{name:8s} {m:3d} {t_blas:10.2f} {t_skinny:10.2f} {tb / (t_blas * 1e-6):12.2f} "
                  f"{tb / (t_skinny * 1e-6):12.2f}")
            record["compare"][f"{name}/{m}"] = dict(cublas_us=t_blas, skinny_us=t_skinny, config=vars(cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
