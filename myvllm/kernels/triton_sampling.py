"""Temperature sampling fused into one pass over the logits (Gumbel-max), in Triton.

For a row with logits x and temperature T > 0,

    argmax_i (x_i / T + g_i),   g_i = -log(-log(u_i)),  u_i ~ U(0, 1)

is a draw from softmax(x / T): no softmax, no normalisation and no float32 copy of
the logits are needed, only one read of them. T == 0 rows take the plain argmax.
The uniforms come from Philox keyed by a per-row 64-bit seed (counter = vocab index),
so a row's draw depends only on its seed and its logits, never on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096
# Keeps -log(u) finite: u is in [0, 1) and log(0) would give an infinite Gumbel.
TINY = tl.constexpr(1e-10)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,  # [N, V]
    stride_row,
    temperatures_ptr,  # [N] float32; 0 = greedy
    seeds_ptr,  # [N] int64
    out_ptr,  # [N] int64
    vocab_size,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    seed = tl.load(seeds_ptr + row)
    inv_t = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    noise_scale = tl.where(temperature > 0.0, 1.0, 0.0)
    best_val = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab_size
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, offs)
        gumbel = -tl.log(-tl.log(u + TINY) + TINY)
        score = x * inv_t + gumbel * noise_scale
        score = tl.where(mask, score, float("-inf"))
        better = score > best_val  # strict: the first index wins ties, like torch.argmax
        best_val = tl.where(better, score, best_val)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best_val, 0)
    # lowest index among the lanes holding the maximum
    candidate = tl.where(best_val == top, best_idx, vocab_size)
    tl.store(out_ptr + row, tl.min(candidate, 0).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [N, V] (any float dtype, unit stride on V): a draw from
    softmax(logits / T) for T > 0, the argmax for T == 0. temperatures [N] float32, seeds [N] int64."""
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (num_rows,) and seeds.shape == (num_rows,)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _gumbel_argmax_kernel[(num_rows,)](logits, logits.stride(0), temperatures, seeds, out, vocab,
                                           BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return out
