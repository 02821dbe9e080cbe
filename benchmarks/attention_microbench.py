"""Microbenchmark of the Triton attention kernels on CUDA.

Decode: achieved bandwidth of decode_attention (bytes of K and V read, over the
median time) against a 3.0 TB/s reference, for several batch sizes, context lengths
and cache block sizes. Caches small enough to sit in L2 are rotated: each call reads
a different set of blocks of one larger cache.

Prefill: TFLOP/s of prefill_attention on a batch of 16 prompts of 1024 tokens
(causal: only the lower triangle is counted).

    python benchmarks/attention_microbench.py [--splits 1,2,4,8,16] [--graph] [--json PATH]
    python benchmarks/attention_microbench.py --kv-cache-dtype fp8 ...   (e4m3 caches, scale 1.0)

Plain timing includes the host's launch cost, which dominates small decode batches;
--graph times replays of a CUDA graph of many calls instead, as the engine runs decode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # capture_util

from capture_util import capture  # noqa: E402

from myvllm.kernels.triton_decode_attention import (
    allocate_decode_workspace,
    decode_attention,
    default_num_splits,
)
from myvllm.kernels.triton_prefill_attention import prefill_attention

PEAK_BYTES_PER_S = 3.0e12
MIN_BYTES_PER_CALL = 256 << 20  # rotate caches until one pass covers this much (L2 is ~50 MB)
MAX_GRAPH_CALLS = 256
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16
KV_DTYPES = {"auto": DTYPE, "fp8": torch.float8_e4m3fn}


def random_kv(shape: tuple[int, ...], kv_dtype: torch.dtype) -> torch.Tensor:
    """A random K or V cache: normal values, or for fp8 random e4m3 values of magnitude below 1
    (bit patterns with the exponent below its bias: never NaN)."""
    if kv_dtype == DTYPE:
        return torch.empty(shape, device="cuda", dtype=DTYPE).normal_()
    return (torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8) & 0xB7).view(kv_dtype)


def kv_scales(kv_dtype: torch.dtype) -> dict:
    ones = torch.ones(NUM_KV_HEADS, device="cuda")
    return {} if kv_dtype == DTYPE else dict(k_scale=ones, v_scale=ones)


def bench(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median milliseconds of fn()."""
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph(fn, calls: int) -> float:
    """Median milliseconds of one fn() call, replayed from a CUDA graph of `calls` calls."""
    return bench(capture(fn, calls).replay) / calls


def decode_case(
    batch: int, context: int, block_size: int, num_splits: int | None, use_graph: bool = False,
    kv_dtype: torch.dtype = DTYPE,
) -> dict:
    """Time decode_attention with every sequence at `context` tokens."""
    blocks_per_seq = triton.cdiv(context, block_size)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * torch.finfo(kv_dtype).bits // 8
    rotations = triton.cdiv(MIN_BYTES_PER_CALL, kv_bytes)
    num_blocks = rotations * batch * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache, scales = random_kv(shape, kv_dtype), random_kv(shape, kv_dtype), kv_scales(kv_dtype)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = perm.view(rotations, batch, blocks_per_seq)  # disjoint blocks per rotation
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    if num_splits is None:
        num_splits = default_num_splits(context, block_size, batch_size=batch, num_kv_heads=NUM_KV_HEADS)
    partial_out, partial_lse = allocate_decode_workspace(batch, NUM_HEADS, HEAD_DIM, num_splits, "cuda")
    scale = HEAD_DIM**-0.5
    step = [0]

    def run() -> None:
        table = tables[step[0] % rotations]
        step[0] += 1
        decode_attention(
            q, k_cache, v_cache, out, seq_lens, table, scale, partial_out, partial_lse, num_splits, **scales
        )

    if use_graph:
        ms = bench_graph(run, min(rotations, MAX_GRAPH_CALLS))
    else:
        ms = bench(run)
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    return {
        "kernel": "decode",
        "batch": batch,
        "context": context,
        "block_size": block_size,
        "num_splits": num_splits,
        "rotations": rotations,
        "graph": use_graph,
        "ms": ms,
        "kv_GBps": gbps,
        "frac_of_peak": gbps * 1e9 / PEAK_BYTES_PER_S,
    }


def decode_mixed_case(batch: int, max_model_len: int = 4096, block_size: int = 256, cache_gib: float = 0.0,
                      kv_dtype: torch.dtype = DTYPE) -> dict:
    """Time decode_attention with context lengths drawn uniformly from [100, 2048] (as in the
    middle of bench.py's run) and the engine's split count (default_num_splits); cache_gib
    spreads the blocks over K and V caches of that many GiB each (as the engine's cache fills
    most of the card)."""
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(100, 2049, (batch,), generator=gen)
    blocks_per_seq = triton.cdiv(int(lens.max()), block_size)
    block_bytes = block_size * NUM_KV_HEADS * HEAD_DIM * torch.finfo(kv_dtype).bits // 8
    num_blocks = max(batch * blocks_per_seq, int(cache_gib * (1 << 30)) // block_bytes)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache, scales = random_kv(shape, kv_dtype), random_kv(shape, kv_dtype), kv_scales(kv_dtype)
    table = torch.randperm(num_blocks, device="cuda")[:batch * blocks_per_seq].to(torch.int32)
    table = table.view(batch, blocks_per_seq)
    seq_lens = lens.to(torch.int32).cuda()
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    num_splits = default_num_splits(max_model_len, block_size, batch_size=batch, num_kv_heads=NUM_KV_HEADS)
    partial_out, partial_lse = allocate_decode_workspace(batch, NUM_HEADS, HEAD_DIM, 16, "cuda")

    def run() -> None:
        decode_attention(q, k_cache, v_cache, out, seq_lens, table, HEAD_DIM**-0.5, partial_out, partial_lse,
                         num_splits, **scales)

    ms = bench_graph(run, 32)
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * torch.finfo(kv_dtype).bits // 8
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    return {"kernel": "decode-mixed", "batch": batch, "num_splits": num_splits, "cache_gib": cache_gib,
            "ms": ms, "kv_GBps": gbps, "frac_of_peak": gbps * 1e9 / PEAK_BYTES_PER_S}


def prefill_case(num_seqs: int, q_len: int, block_size: int, kv_dtype: torch.dtype = DTYPE) -> dict:
    """Time prefill_attention on num_seqs fresh prompts of q_len tokens."""
    blocks_per_seq = triton.cdiv(q_len, block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache, scales = random_kv(shape, kv_dtype), random_kv(shape, kv_dtype), kv_scales(kv_dtype)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(num_seqs, blocks_per_seq)
    q = torch.randn(num_seqs * q_len, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    qsl = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * q_len
    seq_lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM**-0.5

    def run() -> None:
        prefill_attention(q, k_cache, v_cache, out, qsl, seq_lens, block_tables, q_len, scale, **scales)

    ms = bench(run)
    pairs = num_seqs * q_len * (q_len + 1) // 2  # causal query-key pairs
    flops = 4 * pairs * NUM_HEADS * HEAD_DIM  # QK^T and PV, 2 flops per multiply-add
    return {
        "kernel": "prefill",
        "batch": num_seqs,
        "context": q_len,
        "block_size": block_size,
        "ms": ms,
        "TFLOPs": flops / (ms * 1e-3) / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", default="", help="comma list of num_splits to sweep (default: heuristic)")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--contexts", default="64,1024,4096")
    parser.add_argument("--block-sizes", default="256,16")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--graph", action="store_true", help="time decode from CUDA graph replays")
    parser.add_argument("--json", default="", help="write all results to this path")
    parser.add_argument("--mixed", action="store_true", help="only decode with mixed context lengths")
    parser.add_argument("--cache-gib", default="0", help="with --mixed: comma list of K/V cache sizes in GiB")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_DTYPES),
                        help=f"auto: {DTYPE} caches; fp8: e4m3 caches read with scale 1.0")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    splits = [int(s) for s in args.splits.split(",") if s] or [None]
    batches = [int(s) for s in args.batches.split(",") if s]
    contexts = [int(s) for s in args.contexts.split(",") if s]
    block_sizes = [int(s) for s in args.block_sizes.split(",") if s]
    print(f"device: {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    kv_dtype = KV_DTYPES[args.kv_cache_dtype]
    print(f"H={NUM_HEADS} Hkv={NUM_KV_HEADS} D={HEAD_DIM} {DTYPE}, KV cache {kv_dtype}")

    results = []
    if args.mixed:
        for cache_gib in (float(c) for c in args.cache_gib.split(",")):
            for batch in batches:
                r = decode_mixed_case(batch, cache_gib=cache_gib, kv_dtype=kv_dtype)
                results.append(r)
                torch.cuda.empty_cache()
                print(f"decode-mixed B={batch:4d} splits={r['num_splits']:2d} cache={cache_gib:g} GiB: "
                      f"{r['ms'] * 1e3:8.1f} us {r['kv_GBps']:7.0f} GB/s ({100 * r['frac_of_peak']:5.1f}%)",
                      flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    for block_size in block_sizes:
        for batch in batches:
            for context in contexts:
                for num_splits in splits:
                    r = decode_case(batch, context, block_size, num_splits, args.graph, kv_dtype)
                    results.append(r)
                    print(
                        f"decode B={batch:4d} ctx={context:5d} block={block_size:3d} "
                        f"splits={r['num_splits']:2d}: {r['ms'] * 1e3:8.1f} us "
                        f"{r['kv_GBps']:7.0f} GB/s ({100 * r['frac_of_peak']:5.1f}%)",
                        flush=True,
                    )
    if not args.no_prefill:
        for block_size in block_sizes:
            r = prefill_case(16, 1024, block_size, kv_dtype)
            results.append(r)
            print(f"prefill 16x1024 block={block_size}: {r['ms'] * 1e3:8.1f} us {r['TFLOPs']:6.1f} TFLOP/s")

    print()
    print(
        f"{'kernel':8} {'B':>4} {'ctx':>5} {'blk':>4} {'splits':>6} "
        f"{'us':>9} {'GB/s':>7} {'%3TB/s':>7} {'TFLOP/s':>8}"
    )
    for r in results:
        if r["kernel"] == "decode":
            print(
                f"{'decode':8} {r['batch']:4d} {r['context']:5d} {r['block_size']:4d} {r['num_splits']:6d} "
                f"{r['ms'] * 1e3:9.1f} {r['kv_GBps']:7.0f} {100 * r['frac_of_peak']:7.1f} {'':>8}"
            )
        else:
            print(
                f"{'prefill':8} {r['batch']:4d} {r['context']:5d} {r['block_size']:4d} {'':>6} "
                f"{r['ms'] * 1e3:9.1f} {'':>7} {'':>7} {r['TFLOPs']:8.1f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
