"""PassOutput: what one forward pass sampled, as host lists per scheduled sequence."""

from __future__ import annotations

from dataclasses import dataclass

from myvllm.outputs import Logprob
from myvllm.sample.sampler import SamplerOutput
from myvllm.sampling_params import SamplingParams

TokenLogprobs = tuple[float, dict[int, Logprob]]  # (sampled token's logprob, top entries + sampled)
_RANKS = range(1, 1 << 20)  # rank r + 1 of the r-th top entry (sliced, never materialized)


@dataclass
class PassOutput:
    """Per scheduled sequence: its new token (None if its chunk does not end its tokens) and,
    when it asks for logprobs, their entries."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprobs | None]
    # batch row -> the logprob entries of the prompt tokens this pass computed for it, in order
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] | None = None


def sampled_entries(out: SamplerOutput, params: list[SamplingParams],
                    field: str = "logprobs") -> tuple[list[int], list]:
    """(token ids, logprob entries or None) per row of a host SamplerOutput; field names the
    SamplingParams field that gives each row's k (logprobs, or prompt_logprobs)."""
    token_ids = out.token_ids.tolist()
    if out.logprobs is None:
        return token_ids, [None] * len(params)
    chosen, ranks = out.logprobs.tolist(), out.ranks.tolist()
    top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    entries: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        k = getattr(p, field)
        if k is None:
            entries.append(None)
            continue
        # the top k by rank (ranks 1..k), then the sampled token if it is not among them
        d = dict(zip(top_ids[i][:k], map(Logprob, top_lp[i][:k], _RANKS[:k]))) if k and top_ids else {}
        token = token_ids[i]
        if token not in d:
            d[token] = Logprob(chosen[i], ranks[i])
        entries.append((chosen[i], d))
    return token_ids, entries


def prompt_entries(out: SamplerOutput, params: list[SamplingParams], owners: list[int]) -> dict[int, list]:
    """batch row -> its prompt tokens' logprob entries, from a host SamplerOutput over the rows
    (owners: the batch row of each)."""
    _, entries = sampled_entries(out, params, "prompt_logprobs")
    by_row: dict[int, list] = {}
    for row, entry in zip(owners, entries):
        by_row.setdefault(row, []).append(entry[1])
    return by_row


def pass_output(token_ids: list[int], entries: list[TokenLogprobs | None], sample_rows: list[int],
                num_seqs: int) -> PassOutput:
    """The sampled rows' tokens and logprob entries spread over the batch's num_seqs rows
    (sample_rows: ascending, the batch row of each)."""
    if len(sample_rows) == num_seqs:  # every row samples (decode-only batches)
        return PassOutput(token_ids, entries)
    tokens: list[int | None] = [None] * num_seqs
    logprobs: list[TokenLogprobs | None] = [None] * num_seqs
    for row, token, lp in zip(sample_rows, token_ids, entries):
        tokens[row] = token
        logprobs[row] = lp
    return PassOutput(tokens, logprobs)
