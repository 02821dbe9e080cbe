"""Top-k, top-p and min-p sampling without sorting the vocabulary, in Triton, and the raw
logprobs from the same read of the logits.

Every filter keeps the tokens whose (penalised) logit y is at least a per-row threshold:

  - top-k: the k-th largest y; ties with it stay (as in sampler.apply_top_k_top_p);
  - top-p: over the top-k tokens, the smallest y whose more likely tokens hold less than
    top_p of their probability (so a token and every token tied with it stay or go together);
  - min-p: y >= max(y) + T log(min_p), i.e. probability >= min_p x the largest.

The row keeps y >= the largest of the three, and a Gumbel-max draw over those tokens samples
the renormalised softmax(y / T) exactly. Thresholds travel as order keys (triton_sampling.
order_key), so they compare exactly as the float32 values do.

Kernels, each on a grid fixed by N and V (no host sync, CUDA-graph safe):
  1. stats (N, C): per chunk of CHUNK tokens, max y; with logprobs the raw logits' max, sum of
     exp, and the chunk's largest raw logits.
  2. a lower bound L of the row's kept logits, so that few tokens reach it:
     - rows with 1 <= top_k <= C (bound, N): the k-th largest chunk maximum (k chunks reach it,
       so the k-th largest y does);
     - top-p rows without top-k (hist, (N, C), then bound): a histogram of (max y - y) / T in
       BIN_WIDTH bins with the row's exact mass; L is where the tokens above surely hold top_p
       of the mass (a bin's tokens weigh at least exp(-(bin + 1) x width)), one bin deeper for
       rounding. Every token below L has at least top_p of the mass above it.
  3. gather (N, C): the tokens with y >= L, read only in the chunks whose maximum reaches L,
     appended to a per-row list of at most CAP candidates (CAP_LARGE in batches with top-p
     and no top-k).
  4. select (N,): a row whose candidates fit sorts them (in a CAP tile, or a CAP_LARGE one),
     finds its thresholds and draws its token among them. Another row with top-k or top-p
     (a top_k > C, or too many candidates) finds its thresholds by bisection over the order
     keys of its whole row (one pass over the row per step: exact, slow); a row with min-p
     alone needs only max(y).
  5. the Gumbel kernel of triton_sampling.py over the whole vocabulary for the rows not drawn
     in 4, restricted to their thresholds. Both draws use the same uniform per (seed, token), so
     a row's token does not depend on which path drew it, nor on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from myvllm.kernels.triton_sampling import (
    Penalties,
    chunk_layout,
    gumbel_noise,
    gumbel_sample,
    no_penalty_args,
    order_key,
    penalised,
    uniform_at,
)

CHUNK = 1024  # vocab entries per stats / gather program
CAP = 1024  # candidates per row the select kernel sorts
# With top_p and no top_k in the batch, a wide nucleus gets a second, larger tile (compiled only
# for such batches: its sort takes long to compile).
CAP_LARGE = 4096
BLOCK = 1024  # vocab entries per step of the select kernel's whole-row bisection
KEEP_ALL = tl.constexpr(-2147483648)  # order key below every float32's
BINS = 128  # bins of the top-p mass histogram, BIN_WIDTH nats of probability each (the last open)
BIN_WIDTH = 0.125


def candidate_top_k_limit(vocab_size: int) -> int:
    """The largest top_k whose thresholds come from the candidate list (one per stats chunk)."""
    return triton.cdiv(vocab_size, CHUNK)


@dataclass
class RawStats:
    """Per-chunk statistics of the raw logits [N, V] (before penalties), for their logprobs."""

    chunk_max: torch.Tensor  # [N, C] float32
    chunk_sumexp: torch.Tensor  # [N, C] float32: sum of exp(raw - chunk_max)
    top_vals: torch.Tensor  # [N, C, k] float32: each chunk's k largest raw logits
    top_ids: torch.Tensor  # [N, C, k] int32: and their vocab ids


@triton.jit
def _stats_kernel(
    logits_ptr, stride_row,
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    ymax_ptr,  # [N, C] float32: max penalised logit of each chunk
    cand_count_ptr,  # [N] int32: zeroed here for the gather kernel
    rmax_ptr, rsum_ptr,  # [N, C] float32 (LOGPROBS)
    topv_ptr, topi_ptr,  # [N, C, NUM_TOP] (LOGPROBS)
    vocab_size, num_chunks,
    CHUNK: tl.constexpr, LOGPROBS: tl.constexpr, NUM_TOP: tl.constexpr,
    HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < vocab_size
    raw, y = penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
                       presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP)
    part = row * num_chunks + c
    tl.store(ymax_ptr + part, tl.max(y, 0))
    if c == 0:
        tl.store(cand_count_ptr + row, 0)
    if LOGPROBS:
        rm = tl.max(raw, 0)
        tl.store(rmax_ptr + part, rm)
        tl.store(rsum_ptr + part, tl.sum(tl.exp(raw - tl.where(rm == float("-inf"), 0.0, rm)), 0))
        work = raw
        taken = offs >= vocab_size
        for j in tl.static_range(NUM_TOP):
            v = tl.max(tl.where(taken, float("-inf"), work), 0)
            i = tl.min(tl.where((work == v) & ~taken, offs, vocab_size + CHUNK), 0)
            tl.store(topv_ptr + part * NUM_TOP + j, v)
            tl.store(topi_ptr + part * NUM_TOP + j, i)
            taken = taken | (offs == i)


@triton.jit
def _nucleus_rows(temperatures_ptr, top_k_ptr, top_p_ptr, row, vocab_size, HAS_TOP_K: tl.constexpr):
    """Whether row is a top-p row without top-k (its candidates come from the mass histogram)."""
    nucleus = (tl.load(temperatures_ptr + row) > 0.0) & (tl.load(top_p_ptr + row) < 1.0)
    if HAS_TOP_K:
        nucleus = nucleus & (tl.load(top_k_ptr + row) >= vocab_size)
    return nucleus


@triton.jit
def _hist_kernel(
    logits_ptr, stride_row,
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    temperatures_ptr, top_k_ptr, top_p_ptr,
    ymax_ptr,  # [N, C] float32
    hist_ptr,  # [N, C, NB] int32 out: tokens per bin of (max y - y) / T, bins BIN_WIDTH wide, the last open
    mass_ptr,  # [N, C] float32 out: sum of exp((y - max y) / T) over the chunk
    vocab_size, num_chunks,
    CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr, NB: tl.constexpr, BIN_WIDTH: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    if _nucleus_rows(temperatures_ptr, top_k_ptr, top_p_ptr, row, vocab_size, HAS_TOP_K):
        inv_t = 1.0 / tl.load(temperatures_ptr + row)
        pos = tl.arange(0, CHUNKS_PAD)
        y_max = tl.max(tl.load(ymax_ptr + row * num_chunks + pos, mask=pos < num_chunks, other=float("-inf")), 0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < vocab_size
        _, y = penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
                         presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP)
        depth = (y_max - y) * inv_t
        # the last bin takes the deep tokens, those outside the vocabulary and any NaN
        bins = tl.where(depth < (NB - 1) * BIN_WIDTH, tl.maximum(depth, 0.0) * (1.0 / BIN_WIDTH), NB - 1.0)
        bins = tl.minimum(bins.to(tl.int32), NB - 1)
        part = row * num_chunks + c
        tl.store(hist_ptr + part * NB + tl.arange(0, NB), tl.histogram(bins, NB))
        tl.store(mass_ptr + part, tl.sum(tl.exp(-depth), 0))


@triton.jit
def _bound_kernel(
    temperatures_ptr, top_k_ptr, top_p_ptr,
    ymax_ptr,  # [N, C] float32
    hist_ptr, mass_ptr,  # of _hist_kernel (HAS_TOP_P)
    bound_ptr,  # [N] float32 out: every kept token has y >= bound; +inf where the row gathers nothing
    total_ptr,  # [N] float32 out: sum of exp((y - max y) / T) over the row (top-p rows without top-k)
    vocab_size, num_chunks,
    CHUNKS_PAD: tl.constexpr, NB: tl.constexpr, BIN_WIDTH: tl.constexpr, CAP: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    pos = tl.arange(0, CHUNKS_PAD)
    maxima = tl.load(ymax_ptr + row * num_chunks + pos, mask=pos < num_chunks, other=float("-inf"))
    bound = temperature * 0.0 + float("inf")
    if HAS_TOP_K:
        # top-k: the k-th largest chunk maximum (k chunks reach it, so the k-th largest y does)
        k = tl.minimum(tl.load(top_k_ptr + row), vocab_size).to(tl.int32)
        kth_max = tl.sum(tl.where(pos == k - 1, tl.sort(maxima, descending=True), 0.0), 0)
        bound = tl.where((k <= num_chunks) & (temperature > 0.0), kth_max, bound)
    if HAS_TOP_P:
        if _nucleus_rows(temperatures_ptr, top_k_ptr, top_p_ptr, row, vocab_size, HAS_TOP_K):
            # top-p: tokens below a y whose larger tokens surely hold top_p of the mass are dropped;
            # a bin's tokens weigh at least exp(-(bin + 1) x width)
            total = tl.sum(tl.load(mass_ptr + row * num_chunks + pos, mask=pos < num_chunks, other=0.0), 0)
            tl.store(total_ptr + row, total)
            b = tl.arange(0, NB)
            counts = tl.zeros([NB], dtype=tl.int32)
            for start in range(0, num_chunks, 16):
                chunk = start + tl.arange(0, 16)
                counts += tl.sum(tl.load(hist_ptr + (row * num_chunks + chunk[:, None]) * NB + b[None, :],
                                         mask=(chunk < num_chunks)[:, None], other=0), 0)
            surely = tl.cumsum(counts.to(tl.float32) * tl.exp(-(b + 1).to(tl.float32) * BIN_WIDTH), 0)
            target = tl.load(top_p_ptr + row) * total * 1.0001
            deepest = tl.min(tl.where((surely >= target) & (b < NB - 2), b, NB), 0)
            # one bin deeper covers rounding in the bin of a token
            needed = tl.sum(tl.where(b <= deepest + 1, counts, 0), 0)
            y_max = tl.max(maxima, 0)
            bound = tl.where((deepest < NB) & (needed <= CAP), y_max - (deepest + 2) * BIN_WIDTH * temperature,
                             bound)
    tl.store(bound_ptr + row, bound)


@triton.jit
def _gather_kernel(
    logits_ptr, stride_row,
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    bound_ptr, ymax_ptr, cand_count_ptr, cand_val_ptr, cand_idx_ptr,
    vocab_size, num_chunks,
    CHUNK: tl.constexpr, CAP: tl.constexpr,
    HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    bound = tl.load(bound_ptr + row)
    if tl.load(ymax_ptr + row * num_chunks + c) >= bound:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < vocab_size
        _, y = penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
                         presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP)
        sel = (mask & (y >= bound)).to(tl.int32)
        base = tl.atomic_add(cand_count_ptr + row, tl.sum(sel, 0))
        slot = base + tl.cumsum(sel, 0) - 1
        keep = (sel != 0) & (slot < CAP)
        tl.store(cand_val_ptr + row * CAP + slot, y, mask=keep)
        tl.store(cand_idx_ptr + row * CAP + slot, offs, mask=keep)


@triton.jit
def _row_tile(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr, frequency_ptr,
              repetition_ptr, start, BLOCK: tl.constexpr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr):
    """(y, mask) of the row's tokens [start, start + BLOCK): their penalised logits and whether
    they are in the vocabulary."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    _, y = penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
                     presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP)
    return y, mask


@triton.jit
def _count_ge(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr, frequency_ptr,
              repetition_ptr, key, BLOCK: tl.constexpr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr):
    """How many tokens of the row have an order key >= key."""
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK):
        y, mask = _row_tile(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr,
                            frequency_ptr, repetition_ptr, start, BLOCK, HAS_PEN, HAS_REP)
        total += (mask & (order_key(y) >= key)).to(tl.int32)
    return tl.sum(total, 0)


@triton.jit
def _mass_ge(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr, frequency_ptr,
             repetition_ptr, key, y_max, inv_t, BLOCK: tl.constexpr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr):
    """Sum of exp((y - max y) / T) over the tokens of the row with an order key >= key."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab_size, BLOCK):
        y, mask = _row_tile(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr,
                            frequency_ptr, repetition_ptr, start, BLOCK, HAS_PEN, HAS_REP)
        total += tl.where(mask & (order_key(y) >= key), tl.exp((y - y_max) * inv_t), 0.0)
    return tl.sum(total, 0)


@triton.jit
def _draw_candidates(cand_val_ptr, cand_idx_ptr, seeds_ptr, total_ptr, out_ptr, row, count, k, p, thr, y_max, inv_t,
                     vocab_size, ROW_STRIDE: tl.constexpr, SIZE: tl.constexpr, SUB: tl.constexpr,
                     HAS_TOP_P: tl.constexpr):
    """For a row whose count <= SIZE candidates hold every token it keeps: its thresholds from
    the sorted candidates, and its token drawn among them (stored to out). Returns the threshold."""
    pos = tl.arange(0, SIZE)
    valid = pos < count
    vals = tl.load(cand_val_ptr + row * ROW_STRIDE + pos, mask=valid, other=float("-inf"))
    idx = tl.load(cand_idx_ptr + row * ROW_STRIDE + pos, mask=valid, other=vocab_size)
    ordered = tl.sort(vals, descending=True)
    kth = tl.sum(tl.where(pos == k - 1, ordered, 0.0), 0)
    kth = tl.where(k < vocab_size, kth, float("-inf"))
    thr = tl.maximum(thr, order_key(kth))
    if HAS_TOP_P:
        in_top_k = (ordered >= kth) & valid
        w = tl.where(in_top_k, tl.exp((ordered - y_max) * inv_t), 0.0)
        before = tl.cumsum(w, 0) - w  # mass of the more likely tokens
        # without top-k the candidates hold the nucleus, not the whole mass
        total = tl.where(k < vocab_size, tl.sum(w, 0), tl.load(total_ptr + row))
        target = tl.where(p < 1.0, p * total, float("inf"))
        kept = in_top_k & ((before < target) | (pos == 0))
        last = tl.sum(kept.to(tl.int32), 0) - 1
        thr = tl.maximum(thr, order_key(tl.sum(tl.where(pos == last, ordered, 0.0), 0)))
    seed = tl.load(seeds_ptr + row)
    score = tl.where(valid & (order_key(vals) >= thr), vals * inv_t + gumbel_noise(uniform_at(seed, idx, SUB)),
                     float("-inf"))
    best = tl.max(score, 0)
    tl.store(out_ptr + row, tl.min(tl.where(score == best, idx, vocab_size), 0).to(tl.int64))
    return thr


@triton.jit
def _select_kernel(
    logits_ptr, stride_row,
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    temperatures_ptr, seeds_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    ymax_ptr, bound_ptr, total_ptr, cand_count_ptr, cand_val_ptr, cand_idx_ptr,
    thr_ptr,  # [N] int32 out: order key of the smallest y kept
    done_ptr,  # [N] int32 out: 1 where the token is drawn here
    out_ptr,  # [N] int64 out: the token of done rows
    vocab_size, num_chunks,
    CHUNKS_PAD: tl.constexpr, CAP: tl.constexpr, CAPACITY: tl.constexpr, BLOCK: tl.constexpr,
    SUB: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    inv_t = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    pos_c = tl.arange(0, CHUNKS_PAD)
    y_max = tl.max(tl.load(ymax_ptr + row * num_chunks + pos_c, mask=pos_c < num_chunks, other=float("-inf")), 0)
    thr = row * 0 + KEEP_ALL
    done = row * 0
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row)
        if (min_p > 0.0) & (temperature > 0.0):
            thr = order_key(y_max + temperature * tl.log(min_p))
    k = vocab_size
    if HAS_TOP_K:
        k = tl.minimum(tl.load(top_k_ptr + row), vocab_size).to(tl.int32)
    p = temperature * 0.0 + 1.0
    if HAS_TOP_P:
        p = tl.load(top_p_ptr + row)
    if HAS_TOP_K or HAS_TOP_P:
        if (temperature > 0.0) & ((k < vocab_size) | (p < 1.0)):
            count = tl.load(cand_count_ptr + row)
            gathered = tl.load(bound_ptr + row) < float("inf")
            if gathered & (count <= CAP):
                thr = _draw_candidates(cand_val_ptr, cand_idx_ptr, seeds_ptr, total_ptr, out_ptr, row, count, k, p,
                                       thr, y_max, inv_t, vocab_size, CAPACITY, CAP, SUB, HAS_TOP_P)
                done = row * 0 + 1
            if CAPACITY > CAP:
                if gathered & (count > CAP) & (count <= CAPACITY):
                    thr = _draw_candidates(cand_val_ptr, cand_idx_ptr, seeds_ptr, total_ptr, out_ptr, row, count, k,
                                           p, thr, y_max, inv_t, vocab_size, CAPACITY, CAPACITY, SUB, HAS_TOP_P)
                    done = row * 0 + 1
            if done == 0:
                # bisection over the order keys, one pass over the row per step
                top_key = order_key(y_max).to(tl.int64)
                kth_key = top_key * 0 + KEEP_ALL
                if k < vocab_size:
                    lo = kth_key  # count(key >= lo) = V >= k
                    hi = top_key + 1  # count(key >= hi) = 0 < k
                    while hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        n = _count_ge(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, presence_ptr,
                                      frequency_ptr, repetition_ptr, mid, BLOCK, HAS_PEN, HAS_REP)
                        if n >= k:
                            lo = mid
                        else:
                            hi = mid
                    kth_key = lo
                thr = tl.maximum(thr, kth_key.to(tl.int32))
                if p < 1.0:
                    target = p * _mass_ge(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size,
                                          presence_ptr, frequency_ptr, repetition_ptr, kth_key, y_max, inv_t,
                                          BLOCK, HAS_PEN, HAS_REP)
                    # the smallest key K whose strictly larger keys hold less than the target
                    lo = kth_key - 1
                    hi = top_key
                    while hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        above = _mass_ge(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size,
                                         presence_ptr, frequency_ptr, repetition_ptr, mid + 1, y_max, inv_t,
                                         BLOCK, HAS_PEN, HAS_REP)
                        if above < target:
                            hi = mid
                        else:
                            lo = mid
                    thr = tl.maximum(thr, hi.to(tl.int32))
    tl.store(thr_ptr + row, thr)
    tl.store(done_ptr + row, done)


@triton.jit
def _rank_kernel(
    logits_ptr, stride_row, token_ptr,
    rmax_ptr,  # [N, C] float32
    above_ptr,  # [N, C] int32 out: tokens of the chunk with a larger raw logit than the row's token
    vocab_size, num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    chosen = tl.load(row_ptr + tl.load(token_ptr + row)).to(tl.float32)
    part = row * num_chunks + c
    if tl.load(rmax_ptr + part) > chosen:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        raw = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        tl.store(above_ptr + part, tl.sum((raw > chosen).to(tl.int32), 0))
    else:
        tl.store(above_ptr + part, 0)


def _stats(logits: torch.Tensor, pen: tuple, has_pen: bool, has_rep: bool,
           num_logprobs: int | None) -> tuple[torch.Tensor, torch.Tensor, RawStats | None]:
    """Kernel 1: (max y per chunk [N, C], zeroed candidate counts [N], raw stats or None)."""
    n, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    dev = logits.device
    ymax = torch.empty(n, num_chunks, dtype=torch.float32, device=dev)
    cand_count = torch.empty(n, dtype=torch.int32, device=dev)
    top = max(num_logprobs or 0, 0)
    raw = None
    if num_logprobs is not None:
        raw = RawStats(torch.empty(n, num_chunks, dtype=torch.float32, device=dev),
                       torch.empty(n, num_chunks, dtype=torch.float32, device=dev),
                       torch.empty(n, num_chunks, top, dtype=torch.float32, device=dev),
                       torch.empty(n, num_chunks, top, dtype=torch.int32, device=dev))
        bufs = (raw.chunk_max, raw.chunk_sumexp, raw.top_vals, raw.top_ids)
    else:
        bufs = (ymax, ymax, ymax, ymax)
    _stats_kernel[(n, num_chunks)](logits, logits.stride(0), *pen, ymax, cand_count, *bufs, vocab, num_chunks,
                                   CHUNK=CHUNK, LOGPROBS=num_logprobs is not None, NUM_TOP=top,
                                   HAS_PEN=has_pen, HAS_REP=has_rep, num_warps=4, enable_fp_fusion=False)
    return ymax, cand_count, raw


def raw_stats(logits: torch.Tensor, num_logprobs: int) -> RawStats:
    """Per-chunk statistics of logits [N, V] for token_logprobs (one read of the logits)."""
    return _stats(logits, no_penalty_args(logits)[:5], False, False, num_logprobs)[2]


def filtered_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                    top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                    min_p: torch.Tensor | None = None, penalties: Penalties | None = None,
                    num_logprobs: int | None = None) -> tuple[torch.Tensor, RawStats | None]:
    """One token per row of logits [N, V] (any float dtype, unit stride on V), drawn from
    softmax(y / T) restricted to the row's top-k, top-p and min-p tokens (the argmax of y for
    T == 0), y being the logits with `penalties` applied. temperatures [N] float32 (0 = greedy),
    seeds [N] int64; top_k [N] int64 (>= vocab: off), top_p [N] float32 (1: off), min_p [N]
    float32 (0: off), each None when off for every row. With num_logprobs (>= 0) also the raw
    logits' statistics for token_logprobs."""
    n = logits.shape[0]
    assert logits.stride(1) == 1 and temperatures.shape == (n,) and seeds.shape == (n,)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device), None
    if top_k is None and top_p is None and min_p is None:
        raw = raw_stats(logits, num_logprobs) if num_logprobs is not None else None
        return gumbel_sample(logits, temperatures, seeds, penalties=penalties), raw
    out, thresholds, done, raw = thresholds_of(logits, temperatures, seeds, top_k, top_p, min_p, penalties,
                                               num_logprobs)
    gumbel_sample(logits, temperatures, seeds, thresholds, done, penalties, out)
    return out, raw


def thresholds_of(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
                  penalties: Penalties | None, num_logprobs: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RawStats | None]:
    """Kernels 1-4 of filtered_sample: (tokens [N] int64, set where done, thresholds [N] int32
    order keys of the smallest y each row keeps, done [N] int32, raw stats or None)."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    *pen, has_rep = penalties.kernel_args(logits) if penalties is not None else no_penalty_args(logits)
    has_pen = penalties is not None
    ymax, cand_count, raw = _stats(logits, pen, has_pen, has_rep, num_logprobs)
    num_chunks = ymax.shape[1]
    chunks_pad = triton.next_power_of_2(num_chunks)
    dev = logits.device
    capacity = CAP_LARGE if top_k is None and top_p is not None else CAP
    cand_val = torch.empty(n, capacity, dtype=torch.float32, device=dev)
    cand_idx = torch.empty(n, capacity, dtype=torch.int32, device=dev)
    bound = torch.empty(n, dtype=torch.float32, device=dev)
    total = torch.empty(n, dtype=torch.float32, device=dev)
    top_k_arg = top_k if top_k is not None else seeds
    if top_k is not None or top_p is not None:
        hist = mass = ymax
        if top_p is not None:
            hist = torch.empty(n, num_chunks, BINS, dtype=torch.int32, device=dev)
            mass = torch.empty(n, num_chunks, dtype=torch.float32, device=dev)
            _hist_kernel[(n, num_chunks)](logits, logits.stride(0), *pen, temperatures, top_k_arg, top_p, ymax, hist,
                                          mass, vocab, num_chunks, CHUNK=CHUNK, CHUNKS_PAD=chunks_pad, NB=BINS,
                                          BIN_WIDTH=BIN_WIDTH, HAS_TOP_K=top_k is not None, HAS_PEN=has_pen,
                                          HAS_REP=has_rep, num_warps=4, enable_fp_fusion=False)
        _bound_kernel[(n,)](temperatures, top_k_arg, top_p if top_p is not None else temperatures, ymax, hist, mass,
                            bound, total, vocab, num_chunks, CHUNKS_PAD=chunks_pad, NB=BINS, BIN_WIDTH=BIN_WIDTH,
                            CAP=capacity, HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, num_warps=4,
                            enable_fp_fusion=False)
        _gather_kernel[(n, num_chunks)](logits, logits.stride(0), *pen, bound, ymax, cand_count, cand_val, cand_idx,
                                        vocab, num_chunks, CHUNK=CHUNK, CAP=capacity, HAS_PEN=has_pen,
                                        HAS_REP=has_rep, num_warps=4, enable_fp_fusion=False)
    thresholds = torch.empty(n, dtype=torch.int32, device=logits.device)
    done = torch.empty(n, dtype=torch.int32, device=logits.device)
    _, sub = chunk_layout(vocab)
    _select_kernel[(n,)](logits, logits.stride(0), *pen, temperatures, seeds,
                         top_k if top_k is not None else seeds, top_p if top_p is not None else temperatures,
                         min_p if min_p is not None else temperatures, ymax, bound, total, cand_count, cand_val,
                         cand_idx,
                         thresholds, done, out, vocab, num_chunks, CHUNKS_PAD=chunks_pad, CAP=CAP,
                         CAPACITY=capacity, BLOCK=BLOCK,
                         SUB=sub, HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
                         HAS_MIN_P=min_p is not None, HAS_PEN=has_pen, HAS_REP=has_rep, num_warps=4,
                         enable_fp_fusion=False)
    return out, thresholds, done, raw


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int, stats: RawStats
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logprob [N], rank [N], top-k logprobs [N, k], their ids [N, k]) of token_ids under
    log_softmax(logits) [N, V], from raw_stats' statistics (the top-k ones only for k > 0). The
    rank counts the tokens with a larger logit, reading only the chunks whose maximum is larger."""
    n, vocab = logits.shape
    num_chunks = stats.chunk_max.shape[1]
    row_max = stats.chunk_max.amax(dim=-1, keepdim=True)
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    lse = (safe_max + torch.log((stats.chunk_sumexp * torch.exp(stats.chunk_max - safe_max)).sum(-1, keepdim=True)))
    chosen = logits.gather(-1, token_ids[:, None]).float()
    above = torch.empty(n, num_chunks, dtype=torch.int32, device=logits.device)
    if n:
        _rank_kernel[(n, num_chunks)](logits, logits.stride(0), token_ids, stats.chunk_max, above, vocab, num_chunks,
                                      CHUNK=CHUNK, num_warps=4)
    ranks = above.sum(dim=-1) + 1
    if k <= 0:
        return (chosen - lse).squeeze(-1), ranks, None, None
    vals, where = stats.top_vals.view(n, -1).topk(k, dim=-1)
    ids = stats.top_ids.view(n, -1).gather(-1, where).long()
    return (chosen - lse).squeeze(-1), ranks, vals - lse, ids
