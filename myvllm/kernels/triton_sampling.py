"""Temperature sampling fused into one pass over the logits (Gumbel-max), in Triton.

For a row with logits y and temperature T > 0,

    argmax_i (y_i / T + g_i),   g_i = -log(-log(u_i)),  u_i ~ U(0, 1)

is a draw from softmax(y / T): no softmax, no normalisation and no float32 copy of
the logits are needed, only one read of them. T == 0 rows take the plain argmax.
The uniforms come from Philox keyed by a per-row 64-bit seed (four per counter value,
the counter derived from the vocab index, see `_uniform_at`), so a row's draw depends
only on its seed and its logits, never on the batch.

Optionally the draw is restricted to the tokens whose (penalised) logit is at least a
per-row threshold, given as an order-preserving integer key (`order_key`): that is how
top-k / top-p / min-p reach this kernel (kernels/triton_sampling_filters.py finds the
thresholds). Rows marked done (sampled elsewhere) are skipped. Penalties are applied to
the logits as they are read (`penalised`), with the torch reference's arithmetic.

Stage 1, grid (N, ceil(V / CHUNK)): each program scores one chunk of one row and
writes its best (score, index). Stage 2, grid (N,): the best over a row's chunks,
the lowest index among equal scores (as torch.argmax). Splitting the vocabulary
keeps every SM busy at any batch size; one program per row took 105 us at batch 1
on an H100, one row's logits being 300 KB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 4096  # vocab entries per stage-1 program
SUB = 256  # entries per uniform lane per iteration: one Philox call gives 4 uniforms
# Keeps -log(u) finite: u is in [0, 1) and log(0) would give an infinite Gumbel.
TINY = tl.constexpr(1e-10)
MAX_VOCAB = 1 << 22  # vocabularies the sampling kernels take (int32 offsets, small partial tables)


def supports(vocab_size: int, device: torch.device) -> str | None:
    """None when the Triton sampling kernels run for this vocabulary on this device, else why not."""
    if device.type != "cuda":
        return f"device {device.type} is not CUDA"
    if not 1 <= vocab_size <= MAX_VOCAB:
        return f"vocab size {vocab_size} outside [1, {MAX_VOCAB}]"
    return None


@dataclass
class Penalties:
    """The per-row penalty inputs of the torch reference (sampler.apply_penalties)."""

    output_counts: torch.Tensor  # [N, V] float32
    prompt_mask: torch.Tensor | None  # [N, V] bool, None when no row has a repetition penalty
    presence: torch.Tensor  # [N] float32
    frequency: torch.Tensor  # [N] float32
    repetition: torch.Tensor  # [N] float32

    def kernel_args(self, logits: torch.Tensor) -> tuple:
        """(counts, prompt mask, presence, frequency, repetition, HAS_REP) for the kernels."""
        assert self.output_counts.stride(1) == 1 and self.output_counts.stride(0) == logits.shape[1]
        mask = self.prompt_mask if self.prompt_mask is not None else self.output_counts
        return self.output_counts, mask, self.presence, self.frequency, self.repetition, self.prompt_mask is not None


def no_penalty_args(logits: torch.Tensor) -> tuple:
    """Placeholders for the penalty arguments when no row has a penalty (never read)."""
    return logits, logits, logits, logits, logits, False


@triton.jit
def penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
              presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr):
    """(raw, y): the float32 logits of row at offs (-inf outside the vocabulary) and the same
    with the row's penalties applied as sampler.apply_penalties does: the repetition penalty
    divides positive logits (multiplies the others) of prompt or output tokens, then frequency
    x count and presence x (count > 0) are subtracted."""
    raw = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    y = raw
    if HAS_PEN:
        base = row.to(tl.int64) * vocab_size
        count = tl.load(counts_ptr + base + offs, mask=mask, other=0.0)
        seen = count > 0
        if HAS_REP:
            rep = tl.load(repetition_ptr + row)
            in_prompt = tl.load(prompt_ptr + base + offs, mask=mask, other=0) != 0
            y = tl.where(seen | in_prompt, tl.where(y > 0, tl.math.div_rn(y, rep), y * rep), y)
        y = y - tl.load(frequency_ptr + row) * count
        y = y - tl.where(seen, tl.load(presence_ptr + row), 0.0)
    return raw, y


@triton.jit
def order_key(y):
    """int32 keys ordered as the float32 values y (-0.0 and 0.0 share a key, as they compare equal)."""
    bits = y.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(y == 0.0, 0, key)


@triton.jit
def gumbel_noise(u):
    return -tl.log(-tl.log(u + TINY) + TINY)


@triton.jit
def uniform_at(seed, idx, SUB: tl.constexpr):
    """The uniform the chunk kernel draws for vocab entries idx: counter (idx // 4SUB) * SUB +
    idx % SUB, output (idx % 4SUB) // SUB of that Philox call."""
    r = idx % (4 * SUB)
    u0, u1, u2, u3 = tl.rand4x(seed, (idx // (4 * SUB)) * SUB + r % SUB)
    j = r // SUB
    return tl.where(j == 0, u0, tl.where(j == 1, u1, tl.where(j == 2, u2, u3)))


@triton.jit
def _score(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, offs, u, vocab_size, inv_t, noise_scale,
           thr_key, presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN: tl.constexpr, HAS_REP: tl.constexpr,
           HAS_THR: tl.constexpr):
    mask = offs < vocab_size
    _, y = penalised(logits_ptr, counts_ptr, prompt_ptr, row, stride_row, vocab_size, offs, mask,
                     presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP)
    if HAS_THR:
        mask = mask & (order_key(y) >= thr_key)
    return tl.where(mask, y * inv_t + gumbel_noise(u) * noise_scale, float("-inf"))


@triton.jit
def _keep_best(best_val, best_idx, score, offs):
    better = score > best_val  # strict: the first index wins ties, like torch.argmax
    return tl.where(better, score, best_val), tl.where(better, offs, best_idx)


@triton.jit
def _gumbel_chunk_kernel(
    logits_ptr,  # [N, V]
    stride_row,
    temperatures_ptr,  # [N] float32; 0 = greedy
    seeds_ptr,  # [N] int64
    thr_ptr,  # [N] int32 order keys of the smallest logit kept (HAS_THR)
    done_ptr,  # [N] int32: 1 where the row is already sampled (HAS_THR)
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,  # penalties (HAS_PEN)
    part_val_ptr,  # [N, C] float32
    part_idx_ptr,  # [N, C] int32
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    HAS_THR: tl.constexpr,
    HAS_PEN: tl.constexpr,
    HAS_REP: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    todo = True
    thr_key = 0
    if HAS_THR:
        todo = tl.load(done_ptr + row) == 0
        thr_key = tl.load(thr_ptr + row)
    if todo:
        temperature = tl.load(temperatures_ptr + row)
        seed = tl.load(seeds_ptr + row)
        inv_t = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
        noise_scale = tl.where(temperature > 0.0, 1.0, 0.0)
        lane = tl.arange(0, SUB)
        best_val = tl.full([SUB], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([SUB], dtype=tl.int32)
        for it in tl.static_range(CHUNK // (4 * SUB)):
            start = chunk * CHUNK + it * 4 * SUB
            # counter start/4 + lane gives the uniforms of entries start + j * SUB + lane, j < 4
            u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lane)
            offs = start + lane
            best_val, best_idx = _keep_best(best_val, best_idx, _score(
                logits_ptr, counts_ptr, prompt_ptr, row, stride_row, offs, u0, vocab_size, inv_t, noise_scale,
                thr_key, presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP, HAS_THR), offs)
            offs = start + SUB + lane
            best_val, best_idx = _keep_best(best_val, best_idx, _score(
                logits_ptr, counts_ptr, prompt_ptr, row, stride_row, offs, u1, vocab_size, inv_t, noise_scale,
                thr_key, presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP, HAS_THR), offs)
            offs = start + 2 * SUB + lane
            best_val, best_idx = _keep_best(best_val, best_idx, _score(
                logits_ptr, counts_ptr, prompt_ptr, row, stride_row, offs, u2, vocab_size, inv_t, noise_scale,
                thr_key, presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP, HAS_THR), offs)
            offs = start + 3 * SUB + lane
            best_val, best_idx = _keep_best(best_val, best_idx, _score(
                logits_ptr, counts_ptr, prompt_ptr, row, stride_row, offs, u3, vocab_size, inv_t, noise_scale,
                thr_key, presence_ptr, frequency_ptr, repetition_ptr, HAS_PEN, HAS_REP, HAS_THR), offs)
        top = tl.max(best_val, 0)
        # lowest index among the lanes holding the maximum
        idx = tl.min(tl.where(best_val == top, best_idx, vocab_size), 0)
        tl.store(part_val_ptr + row * num_chunks + chunk, top)
        tl.store(part_idx_ptr + row * num_chunks + chunk, idx)


@triton.jit
def _gumbel_reduce_kernel(
    part_val_ptr,  # [N, C] float32
    part_idx_ptr,  # [N, C] int32
    done_ptr,  # [N] int32 (HAS_THR)
    out_ptr,  # [N] int64
    vocab_size,
    num_chunks,
    CHUNKS_PAD: tl.constexpr,
    HAS_THR: tl.constexpr,
):
    row = tl.program_id(0)
    todo = True
    if HAS_THR:
        todo = tl.load(done_ptr + row) == 0
    if todo:
        offs = tl.arange(0, CHUNKS_PAD)
        mask = offs < num_chunks
        val = tl.load(part_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
        idx = tl.load(part_idx_ptr + row * num_chunks + offs, mask=mask, other=vocab_size)
        top = tl.max(val, 0)
        tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, vocab_size), 0).to(tl.int64))


def chunk_layout(vocab: int) -> tuple[int, int]:
    """(CHUNK, SUB) of the Gumbel kernel for a vocabulary: small vocabularies take one small chunk.
    SUB fixes which uniform each vocab entry gets (uniform_at)."""
    chunk = min(CHUNK, max(64, triton.next_power_of_2(vocab)))
    return chunk, min(SUB, chunk // 4)


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  thresholds: torch.Tensor | None = None, done: torch.Tensor | None = None,
                  penalties: Penalties | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [N, V] (any float dtype, unit stride on V): a draw from
    softmax(y / T) for T > 0, the argmax for T == 0, y being the logits with `penalties` applied.
    temperatures [N] float32, seeds [N] int64. With thresholds [N] int32 (order keys) and done
    [N] int32: only tokens whose y has a key >= the row's threshold are drawn, and rows with
    done set keep their entry of `out` (which then must be given)."""
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (num_rows,) and seeds.shape == (num_rows,)
    has_thr = thresholds is not None
    assert not has_thr or (done is not None and out is not None)
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    chunk, sub = chunk_layout(vocab)
    num_chunks = triton.cdiv(vocab, chunk)
    part_val = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    *pen, has_rep = penalties.kernel_args(logits) if penalties is not None else no_penalty_args(logits)
    thr = thresholds if has_thr else seeds
    done_flags = done if has_thr else seeds
    _gumbel_chunk_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), temperatures, seeds, thr, done_flags, *pen, part_val, part_idx, vocab, num_chunks,
        CHUNK=chunk, SUB=sub, HAS_THR=has_thr, HAS_PEN=penalties is not None, HAS_REP=has_rep, num_warps=4,
        enable_fp_fusion=False)
    _gumbel_reduce_kernel[(num_rows,)](part_val, part_idx, done_flags, out, vocab, num_chunks,
                                       CHUNKS_PAD=triton.next_power_of_2(num_chunks), HAS_THR=has_thr, num_warps=1)
    return out
