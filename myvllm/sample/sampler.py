"""Vectorised sampling over a batch of logits.

Per row, in this order: penalties (repetition, then frequency and presence, vLLM's order);
tokens banned until `min_tokens` is reached get -inf;
greedy rows take the argmax; the others divide by their temperature, keep the
top_k logits, keep the smallest set of tokens whose probability reaches top_p,
drop tokens under min_p times the largest probability, and sample. Sampling uses
the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p
exactly and needs no host sync; a row with its own seed draws its E from its own
generator, so its tokens do not depend on what else is in the batch.

On CUDA, rows that need no top-k/top-p/min-p masks are sampled instead by one fused
Gumbel-max kernel (kernels/triton_sampling.py), which reads the logits once; its
uniforms come from a per-row seed, so seeded rows are batch-independent there too.

Log-probabilities are those of the raw model distribution (before temperature
and masks), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from myvllm.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] raw logprob of the sampled token
    ranks: torch.Tensor | None = None  # [N] rank of the sampled token (1 = most likely)
    top_logprobs: torch.Tensor | None = None  # [N, k]
    top_ids: torch.Tensor | None = None  # [N, k]


# With every row's top_k at most this, top-k / top-p sort only each row's top_k-largest logits
# (torch.topk) instead of the whole vocabulary.
PARTIAL_SORT_MAX_K = 1024


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_top_k: int | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the row's top_k and outside its top_p nucleus. max_top_k:
    the largest top_k of the rows when every row has one (known on the host), else None."""
    if top_k is not None and max_top_k is not None and max_top_k <= PARTIAL_SORT_MAX_K:
        # the nucleus lies inside the top-k: only those logits need sorting
        sorted_logits, order = logits.topk(min(max_top_k, logits.shape[-1]), dim=-1)  # [N, max_top_k]
        kept = _mask_sorted(sorted_logits, top_k, top_p)
        return torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    return torch.empty_like(logits).scatter_(-1, order, _mask_sorted(sorted_logits, top_k, top_p))


def _mask_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Logits sorted in descending order per row, -inf past the row's top_k and its top_p nucleus."""
    if top_k is not None:
        rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
        sorted_logits.masked_fill_(rank[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop = mass_before >= top_p[:, None]
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    return sorted_logits


def apply_penalties(logits: torch.Tensor, st: SamplingMetadata) -> torch.Tensor:
    """A float32 copy of logits [N, V] with the rows' penalties applied: the repetition penalty
    divides positive logits (multiplies negative ones) of tokens in the prompt or the output,
    then frequency x count and presence x (count > 0) are subtracted."""
    logits = logits.to(torch.float32, copy=True)
    counts = st.output_counts
    seen = counts > 0
    if st.prompt_mask is not None:
        rep = st.repetition_penalties[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen | st.prompt_mask, penalised, logits)
    logits -= st.frequency_penalties[:, None] * counts
    logits -= st.presence_penalties[:, None] * seen
    return logits


def count_sampled(st: SamplingMetadata, token_ids: torch.Tensor) -> None:
    """Add each row's sampled token to its output counts (the next pass of the batch reads them)."""
    rows = torch.arange(token_ids.shape[0], device=token_ids.device)
    st.output_counts.index_put_((rows, token_ids), torch.ones_like(token_ids, dtype=st.output_counts.dtype),
                                accumulate=True)


def add_token_logprobs(out: SamplerOutput, raw: torch.Tensor, k: int) -> None:
    """Fill out's logprobs of out.token_ids [N] from log-probabilities raw [N, V]: each token's
    own, its rank, and the k most likely tokens' (k > 0)."""
    chosen = raw.gather(-1, out.token_ids[:, None])  # [N, 1]
    out.logprobs = chosen.squeeze(-1)
    out.ranks = (raw > chosen).sum(dim=-1) + 1
    if k > 0:
        out.top_logprobs, out.top_ids = raw.topk(k, dim=-1)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero probabilities under min_p x the row's largest probability."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return probs.masked_fill(probs < threshold, 0.0)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, st: SamplingMetadata, pass_index: int = 0) -> SamplerOutput:
        """logits [N, V] -> sampled token ids [N] (and logprobs when asked); pass_index: which
        pass of a decode window this is (it picks the fused path's seeds)."""
        out = SamplerOutput(token_ids=torch.empty(0))
        if st.num_logprobs is not None:
            raw = torch.log_softmax(logits.float(), dim=-1)
        if st.output_counts is not None:
            logits = apply_penalties(logits, st)
        if st.grammar_bitmask is not None:
            from myvllm.sample.structured import apply_bitmask

            logits = logits.to(torch.float32, copy=st.output_counts is None)
            apply_bitmask(logits, st.grammar_bitmask)
        if st.banned_rows is not None:
            neg_inf = torch.full((), float("-inf"), device=logits.device)  # a device fill, no host copy
            logits = logits.index_put((st.banned_rows, st.banned_tokens), neg_inf)
        if st.all_greedy:
            out.token_ids = logits.argmax(dim=-1)
        elif st.fused_seeds is not None:
            from myvllm.kernels.triton_sampling import gumbel_sample

            out.token_ids = gumbel_sample(logits, st.fused_temperatures, st.fused_seeds[pass_index])
        else:
            logits = logits.float()
            greedy_ids = logits.argmax(dim=-1)
            x = logits / st.temperatures[:, None]
            if st.top_k is not None or st.top_p is not None:
                x = apply_top_k_top_p(x, st.top_k, st.top_p, st.max_top_k)
            probs = x.softmax(dim=-1)
            if st.min_p is not None:
                probs = apply_min_p(probs, st.min_p)
            race = torch.empty_like(probs).exponential_(generator=st.generator)
            for row, gen in st.seeded or ():
                race[row].exponential_(generator=gen)
            sampled = probs.div_(race).argmax(dim=-1)
            out.token_ids = sampled if st.greedy is None else torch.where(st.greedy, greedy_ids, sampled)
        if st.num_logprobs is not None:
            add_token_logprobs(out, raw, st.num_logprobs)
        if st.output_counts is not None:
            count_sampled(st, out.token_ids)
        return out
