"""Vectorised sampling over a batch of logits.

Per row, in this order: penalties (repetition, then frequency and presence, vLLM's order);
tokens banned until `min_tokens` is reached get -inf;
greedy rows take the argmax; the others divide by their temperature, keep the
top_k logits, keep the smallest set of tokens whose probability reaches top_p (ties at
either cut-off kept, see apply_top_k_top_p), drop tokens under min_p times the largest
probability, and sample. Sampling uses
the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p
exactly and needs no host sync; a row with its own seed draws its E from its own
generator, so its tokens do not depend on what else is in the batch.

On CUDA (SamplingMetadata.fused_seeds set) the rows are sampled instead by Triton kernels
(kernels/triton_sampling.py, kernels/triton_sampling_filters.py) that apply the penalties as
they read the logits, turn top-k / top-p / min-p into per-row thresholds without sorting the
vocabulary, and draw by Gumbel-max among the tokens above them; their uniforms come from a
per-row seed, so seeded rows are batch-independent there too. The kernels keep the same
tokens as the reference, ties at the cut-offs included; logprobs come from the same read.

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
    """Set to -inf every logit below the row's top-k / top-p threshold: the top_k-th largest
    logit, ties with it kept; and, over those, the smallest logit whose more likely tokens hold
    less than top_p of their renormalised probability, ties kept again (a token and the tokens
    tied with it stay or go together; top_p >= 1 keeps all). max_top_k: the largest top_k of the
    rows when every row has one (known on the host), else None."""
    return logits.masked_fill(logits < top_k_top_p_thresholds(logits, top_k, top_p, max_top_k), float("-inf"))


def top_k_top_p_thresholds(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                           max_top_k: int | None = None) -> torch.Tensor:
    """[N, 1]: the smallest logit each row keeps under apply_top_k_top_p."""
    vocab = logits.shape[-1]
    if top_k is not None and max_top_k is not None and max_top_k <= PARTIAL_SORT_MAX_K:
        # every kept logit but the ties of the k-th lies in the top max_top_k: only those need sorting
        ordered = logits.topk(min(max_top_k, vocab), dim=-1).values  # [N, max_top_k]
    else:
        ordered = logits.sort(dim=-1, descending=True).values  # [N, V]
    if top_k is not None:
        kth = ordered.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])
    else:
        kth = ordered[:, -1:]
    if top_p is None:
        return kth
    top = ordered[:, :1]
    # the mass of the whole top-k set, ties of the k-th beyond the sorted part included
    total = torch.where(logits >= kth, torch.exp(logits - top), 0.0).sum(-1, keepdim=True)
    weights = torch.where(ordered >= kth, torch.exp(ordered - top), 0.0)
    before = weights.cumsum(dim=-1) - weights  # the mass of the more likely tokens
    kept = (ordered >= kth) & ((before < top_p[:, None] * total) | (top_p[:, None] >= 1.0))
    kept[:, 0] = True  # the most likely token always stays
    return ordered.gather(-1, kept.sum(-1, keepdim=True) - 1)


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
        fused = st.fused_seeds is not None
        raw_logits = logits
        # logprobs by kernel read the raw logits as they are sampled, or on their own
        fast_logprobs = st.num_logprobs is not None and logits_kernels_support(logits)
        if st.num_logprobs is not None and not fast_logprobs:
            raw = torch.log_softmax(logits.float(), dim=-1)
        # greedy batches with penalties take the argmax of the penalised logits by kernel too
        greedy_kernel = (st.all_greedy and st.output_counts is not None and st.grammar_bitmask is None
                         and logits_kernels_support(logits))
        if st.output_counts is not None and not (fused or greedy_kernel):
            logits = apply_penalties(logits, st)
        if st.grammar_bitmask is not None:
            from myvllm.sample.structured import apply_bitmask

            logits = logits.to(torch.float32, copy=logits is raw_logits)  # never mask the raw logits
            apply_bitmask(logits, st.grammar_bitmask)
        if st.banned_rows is not None:
            neg_inf = torch.full((), float("-inf"), device=logits.device)  # a device fill, no host copy
            logits = logits.index_put((st.banned_rows, st.banned_tokens), neg_inf)
        stats = None
        if greedy_kernel:
            from myvllm.kernels.triton_sampling import gumbel_sample

            zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
            out.token_ids = gumbel_sample(logits.contiguous(), zeros.float(), zeros, penalties=kernel_penalties(st))
        elif st.all_greedy:
            out.token_ids = logits.argmax(dim=-1)
        elif fused:
            from myvllm.kernels.triton_sampling_filters import filtered_sample

            with_stats = fast_logprobs and logits is raw_logits
            out.token_ids, stats = filtered_sample(
                logits.contiguous(), st.fused_temperatures, st.fused_seeds[pass_index], st.top_k, st.top_p, st.min_p,
                kernel_penalties(st), st.num_logprobs if with_stats else None)
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
        if fast_logprobs:
            from myvllm.kernels import triton_sampling_filters as kernels

            raw_logits = raw_logits.contiguous()
            if stats is None:
                stats = kernels.raw_stats(raw_logits, st.num_logprobs)
            out.logprobs, out.ranks, out.top_logprobs, out.top_ids = kernels.token_logprobs(
                raw_logits, out.token_ids, st.num_logprobs, stats)
        elif st.num_logprobs is not None:
            add_token_logprobs(out, raw, st.num_logprobs)
        if st.output_counts is not None:
            count_sampled(st, out.token_ids)
        return out


def kernel_penalties(st: SamplingMetadata):
    """The penalty inputs of the sampling kernels, None when no row has a penalty."""
    if st.output_counts is None:
        return None
    from myvllm.kernels.triton_sampling import Penalties

    return Penalties(st.output_counts, st.prompt_mask, st.presence_penalties, st.frequency_penalties,
                     st.repetition_penalties)


def logits_kernels_support(logits: torch.Tensor) -> bool:
    """Whether the Triton sampling kernels take these logits (SamplingMetadataBuilder logs why not)."""
    if logits.device.type != "cuda":
        return False
    from myvllm.kernels.triton_sampling import supports

    return supports(logits.shape[-1], logits.device) is None
