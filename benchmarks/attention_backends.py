"""Per-phase timing of the attention backends (Triton, flash-attn) through the backend interface.

Each case builds the step's AttentionMetadata, calls `backend.prepare(meta)` and
`backend.forward(...)` exactly as a decoder layer does (K/V already in the cache), with
Qwen3-0.6B's heads (H=16, Hkv=8, D=128, bf16) and a block size of 256 (flash-attn's paged
KV needs a multiple of 256):

    decode    B = 1, 8, 64, 256, 512 sequences at 512 and 2048 tokens of context, one new
              token each, timed from CUDA graph replays (as the engine runs decode); GB/s of
              K and V read
    prefill   16 prompts x 1024 tokens and 2 x 8192, fresh (TFLOP/s, causal pairs only)
    prefix    a 256-token chunk after a cached 1792-token prefix, 16 sequences (TFLOP/s)

The table says which backend wins each row; attention/selector.py's MEASURED_FASTER names
the winner of each phase.

    PYTHONPATH=$PWD/.fa2:$PWD python3 benchmarks/attention_backends.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # capture_util

from capture_util import capture  # noqa: E402

from myvllm.attention.backend import AttentionBackend, AttentionMetadata  # noqa: E402
from myvllm.attention.selector import flash_attn_installed  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16
BLOCK_SIZE = 256
MAX_MODEL_LEN = 8192 + BLOCK_SIZE
DECODE_BATCHES = (1, 8, 64, 256, 512)
DECODE_CONTEXTS = (512, 2048)
PREFILL_CASES = ((16, 1024), (2, 8192))
PREFIX_CASE = (16, 1792, 256)  # sequences, cached tokens, new tokens
GRAPH_CALLS = 32
# Caches cycle over this many bytes so that decode reads from HBM, not L2 (~50 MB).
MIN_CACHE_BYTES = 512 << 20


def backends(max_num_seqs: int) -> dict[str, AttentionBackend]:
    from myvllm.attention.triton_backend import TritonAttentionBackend

    found = {"triton": TritonAttentionBackend(NUM_HEADS, HEAD_DIM, max_num_seqs, MAX_MODEL_LEN, BLOCK_SIZE,
                                              torch.device("cuda"))}
    if flash_attn_installed():
        from myvllm.attention.flash_attn_backend import FlashAttnBackend

        found["flash_attn"] = FlashAttnBackend()
    return found


def make_step(q_lens: list[int], seq_lens: list[int], decode: bool, rotations: int = 1):
    """q, caches and `rotations` metadata objects over disjoint blocks of one cache."""
    blocks_per_seq = math.ceil(max(seq_lens) / BLOCK_SIZE)
    num_blocks = rotations * len(seq_lens) * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(rotations, len(seq_lens), blocks_per_seq)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    metas = [AttentionMetadata(slot_mapping=torch.full((sum(q_lens),), -1, device="cuda"), block_tables=tables[r],
                               seq_lens=lens, query_start_loc=qsl, max_query_len=max(q_lens),
                               max_seq_len=max(seq_lens), logits_indices=qsl[1:].long() - 1, is_decode_only=decode)
             for r in range(rotations)]
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, metas


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def decode_ms(backend: AttentionBackend, batch: int, context: int) -> float:
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
    rotations = min(GRAPH_CALLS, max(1, math.ceil(MIN_CACHE_BYTES / kv_bytes)))
    q, k_cache, v_cache, metas = make_step([1] * batch, [context] * batch, True, rotations)
    backend.init_graph_buffers(batch)
    for meta in metas:
        backend.prepare(meta)
    step = [0]

    def run() -> None:
        meta = metas[step[0] % rotations]
        step[0] += 1
        backend.forward(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)

    graph = capture(run, GRAPH_CALLS)
    return median_ms(graph.replay) / GRAPH_CALLS


def prefill_ms(backend: AttentionBackend, q_lens: list[int], seq_lens: list[int]) -> float:
    q, k_cache, v_cache, (meta,) = make_step(q_lens, seq_lens, False)
    backend.prepare(meta)  # once per step, not per layer

    def run() -> None:
        backend.forward(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)

    return median_ms(run)


def causal_flops(q_len: int, seq_len: int) -> int:
    """2 matmuls x 2 flops over the query-key pairs a causal query block attends to."""
    cached = seq_len - q_len
    pairs = q_len * cached + q_len * (q_len + 1) // 2
    return 4 * pairs * NUM_HEADS * HEAD_DIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="write the rows to this path")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    found = backends(max(DECODE_BATCHES))
    names = list(found)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"backends: {names}")
    print(f"H={NUM_HEADS} Hkv={NUM_KV_HEADS} D={HEAD_DIM} {DTYPE} block_size={BLOCK_SIZE}")
    rows = []

    def report(case: str, unit: str, values: dict[str, tuple[float, float]]) -> None:
        """values: backend -> (ms, rate in unit)."""
        best = min(values, key=lambda n: values[n][0])
        cells = "  ".join(f"{n} {ms * 1e3:9.1f} us {rate:8.1f} {unit}" for n, (ms, rate) in values.items())
        ratio = ""
        if "flash_attn" in values:
            ratio = f"  flash_attn/triton time {values['flash_attn'][0] / values['triton'][0]:.2f}x"
        print(f"{case:34s} {cells}  winner {best}{ratio}", flush=True)
        rows.append({"case": case, "unit": unit, "winner": best,
                     **{f"{n}_ms": ms for n, (ms, _) in values.items()},
                     **{f"{n}_{unit}": rate for n, (_, rate) in values.items()}})

    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
            values = {}
            for name in names:
                ms = decode_ms(found[name], batch, context)
                values[name] = (ms, kv_bytes / (ms * 1e-3) / 1e9)
            report(f"decode B={batch} ctx={context}", "GB/s", values)
            torch.cuda.empty_cache()
    for num_seqs, q_len in PREFILL_CASES:
        flops = num_seqs * causal_flops(q_len, q_len)
        values = {}
        for name in names:
            ms = prefill_ms(found[name], [q_len] * num_seqs, [q_len] * num_seqs)
            values[name] = (ms, flops / (ms * 1e-3) / 1e12)
        report(f"prefill {num_seqs}x{q_len}", "TFLOP/s", values)
        torch.cuda.empty_cache()
    num_seqs, cached, new = PREFIX_CASE
    flops = num_seqs * causal_flops(new, cached + new)
    values = {}
    for name in names:
        ms = prefill_ms(found[name], [new] * num_seqs, [cached + new] * num_seqs)
        values[name] = (ms, flops / (ms * 1e-3) / 1e12)
    report(f"prefix hit {num_seqs}x({cached}+{new})", "TFLOP/s", values)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
