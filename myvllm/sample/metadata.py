"""SamplingMetadata: one batch's sampling inputs on the device, and the builder that makes them.

The builder owns the sampling state that lasts across steps: the engine's generator and its
call counter (unseeded rows), and one generator per seeded sequence on the masked path. It
builds a batch's metadata with one host-to-device copy per tensor and no host sync.

Two sampling paths read it (see sample/sampler.py):
  - fused (CUDA, no top_k above the kernels' candidate limit, V / 1024): Triton kernels that
    apply penalties, top-k, top-p and min-p as they read the logits (for constrained rows, a
    copy the grammar bitmask has masked) and draw by Gumbel-max, their uniforms from per-row
    Philox seeds (`fused_seeds`, one row of seeds per pass);
  - masked (otherwise): temperature, masks, and an exponential race whose draws come from
    the engine generator, or a seeded sequence's own generator.
On either path a seeded sequence's tokens depend only on its seed and its token index, never
on the rest of the batch (the two paths draw differently). Penalties, when a row asks for
them, read each row's output-token counts [N, V] on the device; the sampler adds every pass's
token to them, so the passes of one decode batch see each other's tokens without a host sync.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from myvllm.runtime.host_copy import host_to_device
from myvllm.runtime.sequence import Sequence

# Seeds of the fused sampler (62-bit, so they and their increments fit int64): SEED_MIX spreads
# user seeds apart, and each sampling pass of the engine owns ROWS_PER_PASS consecutive seeds.
SEED_MIX = 0x9E3779B97F4A7C15 >> 1
ROWS_PER_PASS = 1 << 20
SEED_MASK = (1 << 62) - 1

logger = logging.getLogger(__name__)


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters on the device for the N sampled rows of one batch."""

    all_greedy: bool
    temperatures: torch.Tensor | None = None  # [N] float32, 1.0 on greedy rows (masked path)
    greedy: torch.Tensor | None = None  # [N] bool, None when no row or every row is greedy
    top_k: torch.Tensor | None = None  # [N] int64; vocab size where disabled
    max_top_k: int | None = None  # the largest top_k when every row has one, else None
    top_p: torch.Tensor | None = None  # [N] float32; 1.0 where disabled
    min_p: torch.Tensor | None = None  # [N] float32; 0.0 where disabled
    seeded: list[tuple[int, torch.Generator]] | None = None  # (row, its generator)
    generator: torch.Generator | None = None  # for rows without a seed
    banned_rows: torch.Tensor | None = None  # [M] rows, paired with banned_tokens [M]
    banned_tokens: torch.Tensor | None = None
    num_logprobs: int | None = None  # the largest logprobs=k among the rows, None if none asks
    # Fused path: temperatures with 0 on greedy rows, and per-pass per-row Philox seeds.
    fused_temperatures: torch.Tensor | None = None  # [N] float32
    fused_seeds: torch.Tensor | None = None  # [num_passes, N] int64
    # Penalties (all set, or all None when no row asks for one); neutral values on other rows.
    output_counts: torch.Tensor | None = None  # [N, V] float32: each row's output tokens, counted
    prompt_mask: torch.Tensor | None = None  # [N, V] bool: each row's prompt tokens (repetition only)
    presence_penalties: torch.Tensor | None = None  # [N] float32
    frequency_penalties: torch.Tensor | None = None  # [N] float32
    repetition_penalties: torch.Tensor | None = None  # [N] float32
    # [N, ceil(V / 32)] int32: the tokens each row allows in the pass being sampled (all on unconstrained
    # rows); set and refilled before every pass by the batch's GrammarWindow (sample/structured.py)
    grammar_bitmask: torch.Tensor | None = None


class SamplingMetadataBuilder:
    """Builds SamplingMetadata for a batch; keeps the generators and counters behind it."""

    def __init__(self, device: torch.device, vocab_size: int, seed: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seq_generators: dict[int, torch.Generator] = {}
        self.num_passes_sampled = 0
        self.kernels = device.type == "cuda" and _kernels_support(vocab_size, device)
        self.kernel_top_k_limit = _kernel_top_k_limit(vocab_size) if self.kernels else 0
        self.logged_torch_filters = False

    def build(self, seqs: list[Sequence], num_passes: int = 1) -> SamplingMetadata:
        """Metadata for sampling seqs' next num_passes tokens (one pass each of a decode window)."""
        dev = self.device
        params = [s.params for s in seqs]
        greedy = np.fromiter((p.is_greedy for p in params), dtype=bool, count=len(params))
        meta = SamplingMetadata(all_greedy=bool(greedy.all()), generator=self.generator)
        penalties = any(p.has_penalties for p in params)
        if penalties:
            self._add_penalties(meta, seqs)
        if not meta.all_greedy:
            temps = np.fromiter((p.temperature for p in params), dtype=np.float32, count=len(params))
            # constrained rows stay on the kernels too: the sampler masks a float32 copy of the logits
            if self.kernels and self._kernel_filters_fit(params):
                temps[greedy] = 0.0
                meta.fused_temperatures = host_to_device(temps, dev)
                meta.fused_seeds = host_to_device(self._row_seeds(seqs, num_passes), dev)
                self._add_filters(meta, params)
            else:
                temps[greedy] = 1.0
                meta.temperatures = host_to_device(temps, dev)
                self._add_masks(meta, seqs, greedy)
        banned = [(i, t) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                  for t in s.min_tokens_banned]
        if banned:
            pairs = np.array(banned, dtype=np.int64)
            meta.banned_rows = host_to_device(pairs[:, 0], dev)
            meta.banned_tokens = host_to_device(pairs[:, 1], dev)
        asks = [p.logprobs for p in params if p.logprobs is not None]
        meta.num_logprobs = max(asks) if asks else None
        return meta

    def release(self, seq_ids: list[int]) -> None:
        """Forget the generators of finished sequences."""
        for seq_id in seq_ids:
            self.seq_generators.pop(seq_id, None)

    def _row_seeds(self, seqs: list[Sequence], num_passes: int) -> np.ndarray:
        """Philox seeds of the fused sampler [num_passes, N]: pass k draws a seeded row at its
        token index + k, the other rows k passes of the engine later."""
        base = (self.seed * SEED_MIX + (self.num_passes_sampled + 1) * ROWS_PER_PASS) & SEED_MASK
        self.num_passes_sampled += num_passes
        seeds = np.arange(base, base + len(seqs), dtype=np.int64)
        step = np.full(len(seqs), ROWS_PER_PASS, dtype=np.int64)
        for i, s in enumerate(seqs):
            if s.seed is not None:
                seeds[i] = (s.seed * SEED_MIX + s.num_output_tokens) & SEED_MASK
                step[i] = 1
        return seeds[None, :] + np.arange(num_passes, dtype=np.int64)[:, None] * step[None, :]

    def _add_masks(self, meta: SamplingMetadata, seqs: list[Sequence], greedy: np.ndarray) -> None:
        """Inputs of the masked path: top-k / top-p / min-p, and generators for seeded rows."""
        dev = self.device
        params = [s.params for s in seqs]
        if greedy.any():
            meta.greedy = host_to_device(greedy, dev)
        self._add_filters(meta, params)
        seeded = [(i, self._generator_for(s)) for i, s in enumerate(seqs) if s.seed is not None and not greedy[i]]
        meta.seeded = seeded or None

    def _kernel_filters_fit(self, params: list) -> bool:
        """Whether the kernels find every row's thresholds from a short candidate list: a top_k
        needs to be <= kernel_top_k_limit (a larger one would bisect its whole row, slower than
        the torch path's sort); logged once when it is not."""
        fit = all(p.is_greedy or not p.top_k_enabled or p.top_k <= self.kernel_top_k_limit for p in params)
        if not fit and not self.logged_torch_filters:
            self.logged_torch_filters = True
            logger.info("batches with a top_k > %d sample on the torch path", self.kernel_top_k_limit)
        return fit

    def _add_filters(self, meta: SamplingMetadata, params: list) -> None:
        """top-k / top-p / min-p per row, each only when some row uses it."""
        dev = self.device
        if any(p.top_k_enabled for p in params):
            top_k = [p.top_k if p.top_k_enabled else self.vocab_size for p in params]
            meta.top_k = host_to_device(np.array(top_k, dtype=np.int64), dev)
            if all(p.top_k_enabled for p in params):
                meta.max_top_k = max(top_k)
        if any(p.top_p < 1.0 for p in params):
            meta.top_p = host_to_device(np.array([p.top_p for p in params], dtype=np.float32), dev)
        if any(p.min_p > 0.0 for p in params):
            meta.min_p = host_to_device(np.array([p.min_p for p in params], dtype=np.float32), dev)

    def _add_penalties(self, meta: SamplingMetadata, seqs: list[Sequence]) -> None:
        """Penalty factors per row, the rows' output-token counts and (for the repetition
        penalty) their prompt tokens, as [N, V] tables on the device. The counts hold the tokens
        the host has; the model runner adds those still in flight."""
        dev, params = self.device, [s.params for s in seqs]

        def factors(name: str) -> torch.Tensor:
            return host_to_device(np.array([getattr(p, name) for p in params], dtype=np.float32), dev)

        meta.presence_penalties = factors("presence_penalty")
        meta.frequency_penalties = factors("frequency_penalty")
        meta.repetition_penalties = factors("repetition_penalty")
        meta.output_counts = self._token_table([s.output_token_ids for s in seqs], torch.float32)
        if any(p.repetition_penalty != 1 for p in params):
            meta.prompt_mask = self._token_table([s.token_ids[:s.num_prompt_tokens] for s in seqs], torch.bool)

    def _token_table(self, tokens: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """[N, V] on the device: row i counts (float) or marks (bool) the ids of tokens[i]."""
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        table = torch.zeros(len(tokens), self.vocab_size, dtype=dtype, device=self.device)
        if lengths.sum() == 0:
            return table
        rows = host_to_device(np.repeat(np.arange(len(tokens), dtype=np.int64), lengths), self.device)
        ids = host_to_device(np.fromiter((t for row in tokens for t in row), dtype=np.int64,
                                         count=int(lengths.sum())), self.device)
        ones = torch.ones(rows.shape[0], dtype=dtype, device=self.device)
        return table.index_put_((rows, ids), ones, accumulate=dtype != torch.bool)

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        gen = self.seq_generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.seed)
            self.seq_generators[seq.seq_id] = gen
        return gen


def _kernels_support(vocab_size: int, device: torch.device) -> bool:
    """Whether the Triton sampling kernels serve this vocabulary; why not is logged at INFO."""
    from myvllm.kernels.triton_sampling import supports

    reason = supports(vocab_size, device)
    if reason is not None:
        logger.info("sampling kernels not used (%s): the torch sampler runs", reason)
    return reason is None


def _kernel_top_k_limit(vocab_size: int) -> int:
    from myvllm.kernels.triton_sampling_filters import candidate_top_k_limit

    return candidate_top_k_limit(vocab_size)
