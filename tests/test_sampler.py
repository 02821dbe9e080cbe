"""Sampler masks on crafted logits, and the sampled distribution against softmax."""

from __future__ import annotations

import math

import pytest
import torch

from myvllm.sample.metadata import SamplingMetadata
from myvllm.sample.sampler import Sampler, apply_min_p, apply_top_k_top_p

NEG_INF = float("-inf")


def kept(x: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(row != NEG_INF).flatten().tolist()) for row in x]


def test_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 5]), None)
    assert kept(out) == [[1, 3], [0, 1, 2, 3, 4]]
    assert torch.equal(out[1], logits[1])
    assert out[0, 1] == 3.0 and out[0, 3] == 2.0


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.5, 0.25, 0.15, 0.1 (in a shuffled order)
    probs = torch.tensor([[0.15, 0.5, 0.1, 0.25]])
    logits = probs.log()
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.6]))) == [[1, 3]]  # 0.5 < 0.6 <= 0.75
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.4]))) == [[1]]  # top token always stays
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.8]))) == [[0, 1, 3]]
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([1.0]))) == [[0, 1, 2, 3]]


def test_top_k_then_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top_k=3 renormalises to 0.444, 0.333, 0.222: top_p=0.7 then keeps two tokens.
    out = apply_top_k_top_p(probs.log(), torch.tensor([3]), torch.tensor([0.7]))
    assert kept(out) == [[0, 1]]


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08], [0.25, 0.25, 0.25, 0.25]])
    out = apply_min_p(probs, torch.tensor([0.2, 0.9]))
    assert torch.nonzero(out[0]).flatten().tolist() == [0, 1, 2]  # threshold 0.1
    assert torch.equal(out[1], probs[1])


def st_for(rows: int, temperature: float, gen: torch.Generator, **kw) -> SamplingMetadata:
    return SamplingMetadata(temperatures=torch.full((rows,), temperature), greedy=None, all_greedy=False,
                           generator=gen, **kw)


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = torch.tensor([True, False, True, False, True, False])
    st = SamplingMetadata(temperatures=torch.tensor([1.0, 5.0, 1.0, 5.0, 1.0, 5.0]), greedy=greedy,
                         all_greedy=False, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, st).token_ids
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])


def test_sampled_masks_are_respected():
    logits = torch.randn(2000, 20, generator=torch.Generator().manual_seed(0))
    st = st_for(2000, 1.0, torch.Generator().manual_seed(1), top_k=torch.full((2000,), 3))
    out = Sampler()(logits, st).token_ids
    top3 = logits.topk(3).indices
    assert (top3 == out[:, None]).any(-1).all()


def test_temperature_sampling_matches_softmax_chi_square():
    """20000 draws from softmax(logits / T) with a fixed seed pass a chi-square test."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    temperature = 0.7
    n = 20000
    st = st_for(n, temperature, torch.Generator().manual_seed(1234))
    draws = Sampler()(logits.expand(n, -1).clone(), st).token_ids
    counts = torch.bincount(draws, minlength=8).double()
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"chi-square {chi2:.2f} over the 0.1% critical value for 7 degrees of freedom"
    # and a wrong temperature is rejected by the same test
    wrong = torch.softmax(logits.double() / 1.0, -1) * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 24.32


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab = 64
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3))

    def sample_with(batch_size: int, position: int) -> list[int]:
        gen = torch.Generator().manual_seed(42)
        tokens = []
        for _ in range(10):
            logits = torch.randn(batch_size, vocab)
            logits[position] = row
            st = st_for(batch_size, 1.0, torch.Generator().manual_seed(len(tokens)), seeded=[(position, gen)])
            tokens.append(int(Sampler()(logits, st).token_ids[position]))
        return tokens

    alone = sample_with(1, 0)
    assert sample_with(7, 3) == alone
    assert sample_with(32, 31) == alone
    assert len(set(alone)) > 1


def test_logprobs_and_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    st = SamplingMetadata(temperatures=torch.ones(1), greedy=None, all_greedy=True, num_logprobs=2)
    out = Sampler()(logits, st)
    ref = torch.log_softmax(logits, -1)
    assert out.token_ids.tolist() == [1]
    assert math.isclose(out.logprobs.item(), ref[0, 1].item(), abs_tol=1e-6)
    assert out.ranks.tolist() == [1]
    assert out.top_ids.tolist() == [[1, 2]]


def test_banned_tokens_cannot_be_sampled():
    logits = torch.tensor([[0.0, 10.0, 1.0], [10.0, 0.0, 1.0]])
    st = SamplingMetadata(temperatures=torch.ones(2), greedy=None, all_greedy=True,
                         banned_rows=torch.tensor([0, 1]), banned_tokens=torch.tensor([1, 0]))
    assert Sampler()(logits, st).token_ids.tolist() == [2, 2]


def _triton_available() -> bool:
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = __import__("pytest").mark.skipif(not _triton_available(), reason="needs triton (CUDA or interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
def test_fused_gumbel_sampling_matches_softmax_chi_square():
    from myvllm.kernels.triton_sampling import gumbel_sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], device=DEVICE)
    n, temperature = 1500, 0.7
    draws = gumbel_sample(logits.expand(n, -1).contiguous(), torch.full((n,), temperature, device=DEVICE),
                          torch.arange(n, dtype=torch.int64, device=DEVICE) * 7919 + 11)
    counts = torch.bincount(draws.cpu(), minlength=8).double()
    expected = torch.softmax(logits.double().cpu() / temperature, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"chi-square {chi2:.2f} over the 0.1% critical value for 7 degrees of freedom"
    wrong = torch.softmax(logits.double().cpu(), -1) * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 24.32


@needs_triton
def test_fused_sampling_greedy_rows_masks_and_seeds():
    from myvllm.kernels.triton_sampling import gumbel_sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=gen).to(DEVICE)
    logits[:, 7] = float("-inf")  # a banned token is never drawn
    temps = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 0.5], device=DEVICE)
    seeds = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int64, device=DEVICE)
    out = gumbel_sample(logits, temps, seeds)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert (out != 7).all()
    # same seed and logits -> same draw, wherever the row sits in the batch
    again = gumbel_sample(logits[[4, 1]], temps[[4, 1]], seeds[[4, 1]])
    assert again.tolist() == [out[4].item(), out[1].item()]
    # bf16 logits are read directly
    assert gumbel_sample(logits.to(torch.bfloat16)[:1], temps[:1], seeds[:1]).item() == logits[0].argmax().item()


@needs_triton
def test_fused_sampling_across_vocab_chunks(monkeypatch):
    """A vocabulary of several stage-1 chunks: the argmax may sit in any chunk, the last one
    partial; equal maxima in two chunks give the lower index; draws follow softmax.
    (Small chunks off CUDA, where the interpreter runs every program.)"""
    from myvllm.kernels import triton_sampling
    from myvllm.kernels.triton_sampling import gumbel_sample

    if DEVICE == "cpu":
        monkeypatch.setattr(triton_sampling, "CHUNK", 64)
    CHUNK = triton_sampling.CHUNK
    vocab = 3 * CHUNK + CHUNK // 3
    logits = torch.full((4, vocab), -5.0)
    for row, (pos, val) in enumerate([(5, 9.0), (CHUNK + 7, 9.0), (vocab - 1, 9.0), (2 * CHUNK + 3, 9.0)]):
        logits[row, pos] = val
    logits[3, CHUNK + 1] = 9.0  # tie with a later chunk: the lower index wins
    greedy = gumbel_sample(logits.to(DEVICE), torch.zeros(4, device=DEVICE),
                           torch.arange(4, dtype=torch.int64, device=DEVICE))
    assert greedy.tolist() == [5, CHUNK + 7, vocab - 1, CHUNK + 1]
    # sampled: the mass sits on four tokens spread over the chunks
    n, temperature = 300, 1.0
    picks = torch.tensor([3, CHUNK + 5, 2 * CHUNK + 9, vocab - 2])
    row = torch.full((vocab,), float("-inf"))
    row[picks] = torch.tensor([1.0, 0.0, 0.5, -0.5])
    draws = gumbel_sample(row.expand(n, -1).contiguous().to(DEVICE), torch.full((n,), temperature, device=DEVICE),
                          torch.arange(n, dtype=torch.int64, device=DEVICE) * 104729 + 3).cpu()
    assert set(draws.tolist()) <= set(picks.tolist())
    counts = torch.stack([(draws == p).sum() for p in picks]).double()
    expected = torch.softmax(row[picks].double(), -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, f"chi-square {chi2:.2f} over the 0.1% critical value for 3 degrees of freedom"


@pytest.mark.parametrize("top_p", [None, [0.9, 0.5, 1.0, 0.2]])
def test_partial_sort_of_the_top_k_equals_the_full_sort(top_p):
    """With every row's top_k known, sorting only the top_k-largest logits keeps the same tokens
    at the same values as sorting the whole vocabulary."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3000, generator=g) * 2
    top_k = torch.tensor([20, 1, 700, 5])
    top_p = None if top_p is None else torch.tensor(top_p)
    full = apply_top_k_top_p(logits.clone(), top_k, top_p)
    partial = apply_top_k_top_p(logits.clone(), top_k, top_p, max_top_k=700)
    assert torch.equal(full, partial)
    assert (partial > float("-inf")).sum(dim=-1).tolist()[1] == 1
    assert (partial[0] > float("-inf")).sum() <= 20


def test_the_builder_gives_the_largest_top_k_only_when_every_row_has_one():
    from myvllm.runtime.sequence import Sequence
    from myvllm.sample.metadata import SamplingMetadataBuilder
    from myvllm.sampling_params import SamplingParams

    builder = SamplingMetadataBuilder(torch.device("cpu"), vocab_size=100, seed=0)

    def seqs(*top_ks):
        return [Sequence(i, str(i), [1, 2], SamplingParams(temperature=1.0, top_k=k)) for i, k in enumerate(top_ks)]

    assert builder.build(seqs(20, 5)).max_top_k == 20
    assert builder.build(seqs(20, -1)).max_top_k is None
    assert builder.build(seqs(20, 5)).top_k.tolist() == [20, 5]
