"""Microbenchmark of the fused MoE (kernels/triton_fused_moe.py, or with --fp8 the block-FP8
kernels/triton_fp8_moe.py) on one layer's experts.

Each case runs fused_experts (alignment, both grouped GEMMs, the top-k sum) for T tokens
routed uniformly at random, replayed from a CUDA graph over LAYERS copies of the experts (so
nothing is served from the L2); times are medians of replays divided by LAYERS. Bandwidth
counts the bytes of the experts the tokens chose (each read once: 2 bytes a weight in bf16,
1 in fp8, scales not counted) and is given against --bandwidth (the H200's device copy by
default); TFLOP/s counts 6 * T * K * H * I.

    python benchmarks/moe_microbench.py [--shape 30b-a3b] [--tokens 1,64,256,1024,8192] [--fp8]
    python benchmarks/moe_microbench.py --tokens 256 --sweep   # also each tile set of SWEEP, best first
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # capture_util

from capture_util import capture  # noqa: E402

from myvllm.kernels import reference_fp8, reference_moe  # noqa: E402
from myvllm.kernels.triton_fp8_moe import fp8_moe_tiles, fused_experts_fp8  # noqa: E402
from myvllm.kernels.triton_fused_moe import MoeTiles, fused_experts, moe_tiles  # noqa: E402

# (experts, top-k, hidden, intermediate per rank)
SHAPES = {"30b-a3b": (128, 8, 2048, 768), "30b-a3b-tp2": (128, 8, 2048, 384),
          "235b-a22b-tp4": (128, 8, 4096, 384), "235b-a22b-tp8": (128, 8, 4096, 192)}
LAYERS = 8
SWEEP = [MoeTiles(m, n, k, g, w, s) for m, n, k, g, w, s in itertools.product(
    (16, 32, 64, 128), (32, 64, 128), (64, 128), (1, 16), (4,), (3,))]


def random_experts(e: int, n: int, k: int, fp8: bool) -> tuple[torch.Tensor, ...]:
    """(w,) in bf16, or (w, scales) in block-FP8, of e random experts [n, k]."""
    w = (torch.randn(e, n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    return reference_fp8.quantize_weight(w) if fp8 else (w,)


def time_case(shape, num_tokens: int, tiles: MoeTiles | None, replays: int = 20,
              fp8: bool = False) -> tuple[float, int]:
    """(median seconds per layer, distinct experts chosen per layer)."""
    e, k, h, i = shape
    x = torch.randn(num_tokens, h, device="cuda").to(torch.bfloat16)
    weights = [(random_experts(e, 2 * i, h, fp8), random_experts(e, h, i, fp8)) for _ in range(LAYERS)]
    topk_w, topk_ids = reference_moe.topk_softmax(torch.randn(num_tokens, e, device="cuda"), k, True)
    topk_w = topk_w.to(torch.bfloat16)

    def run():
        for w13, w2 in weights:
            if fp8:
                fused_experts_fp8(x, *w13, *w2, topk_w, topk_ids, 128, 128, tiles)
            else:
                fused_experts(x, *w13, *w2, topk_w, topk_ids, tiles)

    graph = capture(run)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / LAYERS)
    return statistics.median(times), int(topk_ids.unique().numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES), help="expert shape")
    parser.add_argument("--tokens", default="1,64,256,1024,8192", help="token counts, comma-separated")
    parser.add_argument("--bandwidth", type=float, default=4.27e12, help="bytes/s to compare against")
    parser.add_argument("--sweep", action="store_true", help="also time every tile set of SWEEP")
    parser.add_argument("--fp8", action="store_true", help="block-FP8 experts (128 x 128 scales)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    e, k, h, i = shape
    weight_bytes = 1 if args.fp8 else 2
    sweep = [t for t in SWEEP if t.block_k == 128] if args.fp8 else SWEEP  # fp8: one K step per scale group
    for num_tokens in map(int, args.tokens.split(",")):
        chosen = fp8_moe_tiles(num_tokens, k, e, 128) if args.fp8 else moe_tiles(num_tokens, k, e)
        seconds, hit = time_case(shape, num_tokens, chosen, fp8=args.fp8)
        floor = hit * 3 * h * i * weight_bytes / args.bandwidth
        tflops = 6 * num_tokens * k * h * i / seconds / 1e12
        label = f"{args.shape}{' fp8' if args.fp8 else ''}"
        print(f"{label} T={num_tokens:5d}: {seconds * 1e6:8.1f} us/layer, {hit} experts, weights at "
              f"{floor / seconds:5.1%} of {args.bandwidth / 1e12:.2f} TB/s, {tflops:6.1f} TFLOP/s  {chosen}")
        if args.sweep:
            results = []
            for tiles in sweep:
                try:
                    results.append((time_case(shape, num_tokens, tiles, replays=5, fp8=args.fp8)[0], tiles))
                except Exception as exc:  # a tile set the card cannot run (shared memory): skip it
                    print(f"    {tiles}: {type(exc).__name__}")
            for t, tiles in sorted(results, key=lambda r: r[0])[:5]:
                print(f"    {t * 1e6:8.1f} us  {floor / t:5.1%}  {tiles}")


if __name__ == "__main__":
    main()
