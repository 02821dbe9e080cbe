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


# ---- the filtered distribution, against a direct computation of its definition ----------------

# 0.1% critical values of the chi-square distribution by degrees of freedom
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
                 10: 29.59, 11: 31.26}
# Twelve logits with ties: 3 | 2, 2 | 1.5 | 1, 1, 1 | 0.5 | 0 | -0.5 | -1 | -2, in a shuffled order.
TIED = torch.tensor([1.0, -0.5, 2.0, 0.0, 1.0, 3.0, -2.0, 1.5, 2.0, 0.5, -1.0, 1.0])


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None) -> torch.Tensor:
    """The sampled distribution by definition, in float64: top-k keeps every token at least as
    likely as the k-th; top-p keeps, of those, each token whose strictly more likely tokens hold
    less than top_p of their probability; min-p keeps probabilities >= min_p x the largest."""
    x = logits.double() / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        keep &= x >= x.sort(descending=True).values[min(top_k, x.numel()) - 1]
    if top_p is not None and top_p < 1:
        p = torch.where(keep, x, float("-inf")).softmax(-1)
        mass_above = torch.stack([(p * (x > xi)).sum() for xi in x])
        keep &= mass_above < top_p
    if min_p is not None:
        p = torch.where(keep, x, float("-inf")).softmax(-1)
        keep &= p >= min_p * p.max()
    return torch.where(keep, x, float("-inf")).softmax(-1)


def assert_draws_follow(draws: torch.Tensor, probs: torch.Tensor) -> None:
    """No draw outside the support; a chi-square test at 0.1% over the support."""
    counts = torch.bincount(draws.cpu(), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"tokens drawn outside the kept set: {torch.nonzero(counts * ~support)}"
    expected = probs[support] * draws.numel()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert chi2 < CHI2_CRITICAL[df], f"chi-square {chi2:.2f} over {CHI2_CRITICAL[df]} ({df} degrees of freedom)"


FILTER_CASES = [  # (temperature, top_k, top_p, min_p): each filter alone and combined
    (1.0, 2, None, None),  # a tie at the k-th: three tokens stay
    (0.8, 5, None, None),  # three tied at the k-th
    (1.0, 100, None, None),  # top_k larger than the vocabulary
    (1.0, None, 0.45, None),  # the nucleus cut falls inside a tie: both tied tokens stay
    (0.7, None, 0.9, None),
    (1.0, None, 1.0, None),  # top_p = 1 keeps everything
    (1.0, None, None, 0.2),
    (1.0, None, None, 0.0),  # min_p = 0 keeps everything
    (0.9, 5, 0.8, 0.1),  # all three
]


def filter_tensors(rows: int, top_k, top_p, min_p, vocab: int) -> dict:
    return dict(top_k=None if top_k is None else torch.full((rows,), top_k),
                top_p=None if top_p is None else torch.full((rows,), top_p),
                min_p=None if min_p is None else torch.full((rows,), min_p))


def test_the_reference_keeps_every_tie_at_the_cut_off():
    x = TIED[None, :]
    assert kept(apply_top_k_top_p(x, torch.tensor([2]), None)) == [[2, 5, 8]]
    assert kept(apply_top_k_top_p(x, torch.tensor([5]), None, max_top_k=5)) == [[0, 2, 4, 5, 7, 8, 11]]
    assert kept(apply_top_k_top_p(x, None, torch.tensor([0.45]))) == [[2, 5, 8]]
    assert kept(apply_top_k_top_p(x, torch.tensor([100]), torch.tensor([1.0]))) == [list(range(12))]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", FILTER_CASES)
def test_torch_sampler_draws_the_filtered_distribution(temperature, top_k, top_p, min_p):
    n = 20000
    probs = filtered_probs(TIED, temperature, top_k, top_p, min_p)
    st = st_for(n, temperature, torch.Generator().manual_seed(7), **filter_tensors(n, top_k, top_p, min_p, 12))
    draws = Sampler()(TIED.expand(n, -1).clone(), st).token_ids
    assert_draws_follow(draws, probs)
    unfiltered = torch.softmax(TIED.double() / temperature, -1)
    if not torch.allclose(probs, unfiltered):  # the test tells the filter from no filter
        with pytest.raises(AssertionError):
            assert_draws_follow(draws, unfiltered)


# ---- the Triton sampling kernels (interpreted on CPU), against the definition ------------------


def key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """The float32 value of order keys (triton_sampling.order_key's inverse); -inf for the key
    below every float's, which keeps every token."""
    keys = keys.to(torch.int32)
    values = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys).view(torch.float32)
    return values.masked_fill(keys == torch.iinfo(torch.int32).min, float("-inf"))


@pytest.fixture
def small_chunks(monkeypatch):
    """Kernel tiles for a 12-token vocabulary: three stats chunks, room for four candidates (eight
    in batches with top-p and no top-k)."""
    from myvllm.kernels import triton_sampling_filters as kernels

    monkeypatch.setattr(kernels, "CHUNK", 4)
    monkeypatch.setattr(kernels, "CAP", 4)
    monkeypatch.setattr(kernels, "CAP_LARGE", 8)
    monkeypatch.setattr(kernels, "BLOCK", 8)
    return kernels


@needs_triton
def test_kernel_thresholds_keep_exactly_the_filtered_set(small_chunks):
    """Every filter case, on the candidate path (top_k <= 3 chunks, or top_p alone, with <= 4
    candidates) and on the bisection path (larger top_k, or too many candidates)."""
    rows = [(t, k, p, m) for t, k, p, m in FILTER_CASES] + [(1.0, 3, 0.6, None), (0.5, 1, None, None),
                                                          (1.0, 3, None, None)]
    n = len(rows)
    logits = TIED.expand(n, -1).clone()
    logits[-1] = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0])  # 6 candidates > CAP
    temps = torch.tensor([r[0] for r in rows])
    top_k = torch.tensor([r[1] or 12 for r in rows])
    top_p = torch.tensor([r[2] or 1.0 for r in rows])
    min_p = torch.tensor([r[3] or 0.0 for r in rows])
    dev = DEVICE
    _, thr, done, _ = small_chunks.thresholds_of(logits.to(dev), temps.to(dev), torch.arange(n).to(dev),
                                                 top_k.to(dev), top_p.to(dev), min_p.to(dev), None, None)
    assert done.tolist()[:5] == [1, 0, 0, 1, 0] and done[-3] == 1 and done[-1] == 0  # both paths ran
    kept_by_kernel = logits >= key_to_float(thr.cpu())[:, None]
    for i, (t, k, p, m) in enumerate(rows):
        assert torch.equal(kept_by_kernel[i], filtered_probs(logits[i], t, k, p, m) > 0), rows[i]


@needs_triton
def test_kernel_top_p_alone_sorts_a_wide_nucleus_in_the_large_tile(small_chunks):
    """Without top-k in the batch, up to CAP_LARGE (8) candidates are sorted; more bisect."""
    logits = torch.stack([TIED / 2, TIED / 4, TIED])
    temps = torch.ones(3)
    top_p = torch.tensor([0.7, 0.99, 0.45])
    dev = DEVICE
    _, thr, done, _ = small_chunks.thresholds_of(logits.to(dev), temps.to(dev), torch.arange(3).to(dev), None,
                                                 top_p.to(dev), None, None, None)
    kept_by_kernel = logits >= key_to_float(thr.cpu())[:, None]
    for i in range(3):
        assert torch.equal(kept_by_kernel[i], filtered_probs(logits[i], 1.0, None, float(top_p[i])) > 0), i
    assert done.tolist() == [1, 0, 1]
    assert int(kept_by_kernel[0].sum()) > 4  # more than the small tile holds


@needs_triton
def test_kernel_draws_the_filtered_distribution(small_chunks):
    """top_k 2 with a tie at the k-th (three tokens), top_p 0.95 (the candidate path)."""
    n, temperature = 300, 0.8
    probs = filtered_probs(TIED, temperature, 2, 0.95, None)
    draws, _ = small_chunks.filtered_sample(
        TIED.expand(n, -1).contiguous().to(DEVICE), torch.full((n,), temperature, device=DEVICE),
        torch.arange(n, dtype=torch.int64, device=DEVICE) * 7919 + 5, torch.full((n,), 2, device=DEVICE),
        torch.full((n,), 0.95, device=DEVICE), None)
    assert_draws_follow(draws, probs)
    exactly_two = torch.zeros(12, dtype=torch.float64)
    exactly_two[[5, 2]] = torch.softmax(TIED[[5, 2]].double() / temperature, -1)
    for wrong in (exactly_two, torch.softmax(TIED.double() / temperature, -1)):
        with pytest.raises(AssertionError):
            assert_draws_follow(draws, wrong)


@needs_triton
def test_kernel_token_depends_on_seed_and_logits_only(small_chunks, monkeypatch):
    """A seeded row draws the same token wherever it sits in the batch, and whether its thresholds
    come from the candidates or from bisection."""
    gen = torch.Generator().manual_seed(5)
    row = TIED.clone()

    def draw(batch: int, position: int, cap: int) -> int:
        monkeypatch.setattr(small_chunks, "CAP", cap)
        logits = torch.randn(batch, 12, generator=gen)
        logits[position] = row
        seeds = torch.randint(0, 1 << 40, (batch,), generator=gen)
        seeds[position] = 12345
        tokens, _ = small_chunks.filtered_sample(logits.to(DEVICE), torch.full((batch,), 1.5, device=DEVICE),
                                                 seeds.to(DEVICE), torch.full((batch,), 3, device=DEVICE),
                                                 torch.full((batch,), 0.95, device=DEVICE), None)
        return int(tokens[position])

    alone = draw(1, 0, 4)
    assert draw(5, 3, 4) == alone and draw(3, 2, 1) == alone  # cap 1: bisection


@needs_triton
def test_kernel_penalties_match_the_reference(small_chunks):
    from myvllm.kernels.triton_sampling import Penalties
    from myvllm.sample.sampler import apply_penalties

    gen = torch.Generator().manual_seed(2)
    n, vocab = 4, 12
    logits = torch.randn(n, vocab, generator=gen) * 2
    counts = torch.randint(0, 3, (n, vocab), generator=gen).float()
    prompt = torch.rand(n, vocab, generator=gen) < 0.3
    st = SamplingMetadata(all_greedy=False, output_counts=counts, prompt_mask=prompt,
                          presence_penalties=torch.tensor([0.0, 1.5, 0.3, -0.5]),
                          frequency_penalties=torch.tensor([0.0, 0.2, -0.7, 0.1]),
                          repetition_penalties=torch.tensor([1.0, 1.05, 1.7, 0.8]))
    penalised = apply_penalties(logits, st)
    pen = Penalties(counts.to(DEVICE), prompt.to(DEVICE), st.presence_penalties.to(DEVICE),
                    st.frequency_penalties.to(DEVICE), st.repetition_penalties.to(DEVICE))
    temps = torch.tensor([0.0, 1.0, 0.7, 1.0], device=DEVICE)
    top_k = torch.tensor([12, 3, 2, 12], device=DEVICE)
    top_p = torch.tensor([1.0, 0.8, 1.0, 0.5], device=DEVICE)
    tokens, thr, done, _ = small_chunks.thresholds_of(logits.to(DEVICE), temps, torch.arange(n, device=DEVICE),
                                                      top_k, top_p, None, pen, None)
    kept_by_kernel = penalised >= key_to_float(thr.cpu())[:, None]
    for i in range(1, n):
        expected = filtered_probs(penalised[i], float(temps[i]), int(top_k[i]), float(top_p[i])) > 0
        assert torch.equal(kept_by_kernel[i], expected), i
    drawn, _ = small_chunks.filtered_sample(logits.to(DEVICE), temps, torch.arange(n, device=DEVICE), top_k, top_p,
                                            None, pen)
    assert int(drawn[0]) == int(penalised[0].argmax())  # greedy row: the argmax of the penalised logits
    assert all(kept_by_kernel[i, int(drawn[i])] for i in range(n))


@needs_triton
def test_kernel_logprobs_match_the_reference(small_chunks):
    from myvllm.sample.sampler import SamplerOutput, add_token_logprobs

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 14, generator=gen) * 3  # the last chunk holds fewer than k tokens
    tokens = torch.tensor([5, 0, 13])
    ref = SamplerOutput(token_ids=tokens)
    add_token_logprobs(ref, torch.log_softmax(logits, -1), 3)
    d = logits.to(DEVICE)
    stats = small_chunks.raw_stats(d, 3)
    logprobs, ranks, top_logprobs, top_ids = small_chunks.token_logprobs(d, tokens.to(DEVICE), 3, stats)
    assert torch.allclose(logprobs.cpu(), ref.logprobs, atol=1e-5)
    assert torch.equal(ranks.cpu(), ref.ranks)
    assert torch.allclose(top_logprobs.cpu(), ref.top_logprobs, atol=1e-5)
    assert torch.equal(top_ids.cpu(), ref.top_ids)


# ---- the kernels on CUDA at Qwen3's vocabulary ----------------------------------------------

QWEN3_VOCAB = 151936
# per row, cycling: (temperature, top_k, top_p, min_p); top_k = vocab and top_p = 1 are off
GPU_ROWS = [(0.6, 20, 0.95, 0.0), (1.0, 50, 1.0, 0.0), (1.0, QWEN3_VOCAB, 0.9, 0.0), (0.8, QWEN3_VOCAB, 1.0, 0.05),
            (0.7, 1000, 0.8, 0.0), (0.0, 20, 0.95, 0.0), (1.3, 5, 0.5, 0.1)]


def chi2_critical(df: int) -> float:
    """The 0.1% critical value of chi-square (Wilson-Hilferty; within 1% for df >= 3)."""
    if df in CHI2_CRITICAL:
        return CHI2_CRITICAL[df]
    return df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


def gpu_logits(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[n, V] logits shaped like a language model's: a bulk of small values and a head of 64
    likely tokens per row (bf16 gives ties in both)."""
    logits = torch.randn(n, QWEN3_VOCAB, generator=gen, device="cuda")
    head = torch.randint(0, QWEN3_VOCAB, (n, 64), generator=gen, device="cuda")
    logits.scatter_(1, head, 14 + 1.5 * torch.randn(n, 64, generator=gen, device="cuda"))
    return logits.to(dtype)


def gpu_params(n: int, vocab: int = QWEN3_VOCAB) -> dict:
    rows = [GPU_ROWS[i % len(GPU_ROWS)] for i in range(n)]
    return dict(temperatures=torch.tensor([r[0] for r in rows], device="cuda"),
                top_k=torch.tensor([min(r[1], vocab) for r in rows], device="cuda"),
                top_p=torch.tensor([r[2] for r in rows], device="cuda"),
                min_p=torch.tensor([r[3] for r in rows], device="cuda"))


def reference_kept(y: torch.Tensor, p: dict) -> torch.Tensor:
    """[N, V] bool: the tokens the torch reference keeps for penalised float32 logits y."""
    t = torch.where(p["temperatures"] > 0, p["temperatures"], 1.0)
    x = y / t[:, None]
    x = apply_top_k_top_p(x, p["top_k"], p["top_p"])
    return apply_min_p(x.softmax(-1), p["min_p"]) > 0


def assert_kept_sets_agree(y: torch.Tensor, thr: torch.Tensor, p: dict, tol: float = 1e-5) -> None:
    """Top-k sets equal exactly; where top-p or min-p also cut, the sets may differ only by tokens
    whose probabilities sum under tol (their cut-off is a float32 sum, rounded differently)."""
    kernel = y >= key_to_float(thr)[:, None]
    ref = reference_kept(y, p)
    sampled = p["temperatures"] > 0
    t = torch.where(sampled, p["temperatures"], 1.0)
    probs = torch.softmax(y.double() / t[:, None], -1)
    differ = (kernel != ref) & sampled[:, None]
    pure_top_k = (p["top_p"] >= 1) & (p["min_p"] == 0)
    assert not differ[pure_top_k].any(), "top-k sets differ"
    mass = (probs * differ).sum(-1) / (probs * ref).sum(-1)
    assert float(mass.max()) < tol, f"kept sets differ by {float(mass.max()):.2e} of the mass"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64, 256])
def test_gpu_kernel_thresholds_match_the_reference(n, dtype):
    from myvllm.kernels.triton_sampling_filters import filtered_sample, thresholds_of

    gen = torch.Generator(device="cuda").manual_seed(n)
    logits = gpu_logits(n, dtype, gen)
    p = gpu_params(n)
    seeds = torch.arange(n, dtype=torch.int64, device="cuda") * 1000003
    args = (p["temperatures"], seeds, p["top_k"], p["top_p"], p["min_p"])
    _, thr, done, _ = thresholds_of(logits, *args, None, None)
    y = logits.float()
    assert_kept_sets_agree(y, thr, p)
    nucleus = (p["top_k"] >= QWEN3_VOCAB) & (p["top_p"] < 1)
    small_k = (p["top_k"] <= QWEN3_VOCAB // 1024) & (p["temperatures"] > 0)
    done = done.bool()
    # rows with a small top_k always finish on the candidate path; a top-p-only row does unless its
    # nucleus overflows the candidate tile (then the exact fallback takes it); no other row does
    assert torch.equal(done & small_k, small_k), "rows with top_k <= chunks take the candidate path"
    assert not (done & ~(small_k | (nucleus & (p["temperatures"] > 0)))).any()
    tokens, _ = filtered_sample(logits, *args)
    kept = reference_kept(y, p)
    assert kept.gather(-1, tokens[:, None]).all()
    greedy = p["temperatures"] == 0
    assert torch.equal(tokens[greedy], y.argmax(-1)[greedy])


@pytest.mark.gpu
def test_gpu_kernel_draws_the_filtered_distribution():
    """10,240 draws of one row under Qwen3's sampling: chi-square over its kept tokens."""
    from myvllm.kernels.triton_sampling_filters import filtered_sample

    gen = torch.Generator(device="cuda").manual_seed(0)
    row = torch.randn(QWEN3_VOCAB, generator=gen, device="cuda")
    row[:30] = torch.linspace(9.0, 8.0, 30, device="cuda")  # the top tokens, none far more likely than the rest
    n, calls = 256, 40
    p = dict(temperatures=torch.full((n,), 0.6, device="cuda"), top_k=torch.full((n,), 20, device="cuda"),
             top_p=torch.full((n,), 0.95, device="cuda"), min_p=torch.zeros(n, device="cuda"))
    logits = row.expand(n, -1).contiguous()
    draws = torch.cat([filtered_sample(logits, p["temperatures"], torch.arange(n, device="cuda") + c * n,
                                       p["top_k"], p["top_p"], None)[0] for c in range(calls)])
    x = row.double() / 0.6
    keep = reference_kept(row[None], {k: v[:1] for k, v in p.items()})[0]
    probs = torch.where(keep, x, float("-inf")).softmax(-1)
    counts = torch.bincount(draws, minlength=QWEN3_VOCAB).double()
    assert counts[~keep].sum() == 0
    expected = probs[keep] * draws.numel()
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_critical(int(keep.sum()) - 1), chi2


@pytest.mark.gpu
def test_gpu_seeded_rows_do_not_depend_on_the_batch():
    from myvllm.kernels.triton_sampling_filters import filtered_sample

    gen = torch.Generator(device="cuda").manual_seed(1)
    row = gpu_logits(1, torch.bfloat16, gen)[0]
    tokens = []
    for n, pos in [(1, 0), (7, 3), (64, 63), (256, 100)]:
        logits = gpu_logits(n, torch.bfloat16, gen)
        logits[pos] = row
        seeds = torch.randint(0, 1 << 40, (n,), generator=gen, device="cuda")
        seeds[pos] = 777
        p = gpu_params(n)
        for key in ("temperatures", "top_k", "top_p", "min_p"):
            p[key][pos] = p[key][0]  # Qwen3's sampling
        out, _ = filtered_sample(logits, p["temperatures"], seeds, p["top_k"], p["top_p"], p["min_p"])
        tokens.append(int(out[pos]))
    assert len(set(tokens)) == 1, tokens


def gpu_penalties(n: int, gen: torch.Generator):
    from myvllm.kernels.triton_sampling import Penalties

    counts = torch.zeros(n, QWEN3_VOCAB, device="cuda")
    ids = torch.randint(0, QWEN3_VOCAB, (n, 300), generator=gen, device="cuda")
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    prompt = torch.zeros(n, QWEN3_VOCAB, dtype=torch.bool, device="cuda")
    prompt.scatter_(1, torch.randint(0, QWEN3_VOCAB, (n, 500), generator=gen, device="cuda"), True)
    return Penalties(counts, prompt, torch.full((n,), 1.5, device="cuda"), torch.full((n,), 0.3, device="cuda"),
                     torch.full((n,), 1.05, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [7, 256])
def test_gpu_kernel_penalties_match_the_reference(n):
    from myvllm.kernels.triton_sampling_filters import filtered_sample, thresholds_of
    from myvllm.sample.sampler import apply_penalties

    gen = torch.Generator(device="cuda").manual_seed(3)
    logits = gpu_logits(n, torch.bfloat16, gen)
    pen = gpu_penalties(n, gen)
    # the hottest tokens are penalised, so that penalties change the top-k
    pen.output_counts[:, logits[0].float().topk(10).indices] = 2.0
    st = SamplingMetadata(all_greedy=False, output_counts=pen.output_counts, prompt_mask=pen.prompt_mask,
                          presence_penalties=pen.presence, frequency_penalties=pen.frequency,
                          repetition_penalties=pen.repetition)
    y = apply_penalties(logits, st)
    p = gpu_params(n)
    seeds = torch.arange(n, dtype=torch.int64, device="cuda")
    args = (p["temperatures"], seeds, p["top_k"], p["top_p"], p["min_p"], pen)
    _, thr, _, _ = thresholds_of(logits, *args, None)
    assert_kept_sets_agree(y, thr, p)
    tokens, _ = filtered_sample(logits, *args)
    assert reference_kept(y, p).gather(-1, tokens[:, None]).all()
    greedy = p["temperatures"] == 0
    assert torch.equal(tokens[greedy], y.argmax(-1)[greedy])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 64, 256])
def test_gpu_kernel_logprobs_match_the_reference(n, dtype):
    from myvllm.kernels.triton_sampling_filters import filtered_sample, token_logprobs

    gen = torch.Generator(device="cuda").manual_seed(4)
    logits = gpu_logits(n, dtype, gen)
    p = gpu_params(n)
    tokens, stats = filtered_sample(logits, p["temperatures"], torch.arange(n, device="cuda"), p["top_k"],
                                    p["top_p"], p["min_p"], None, 5)
    logprobs, ranks, top_logprobs, top_ids = token_logprobs(logits, tokens, 5, stats)
    raw = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(logprobs, raw.gather(-1, tokens[:, None])[:, 0], atol=1e-5)
    chosen = logits.float().gather(-1, tokens[:, None])
    assert torch.equal(ranks, (logits.float() > chosen).sum(-1) + 1)
    ref_top = raw.topk(5, dim=-1).values
    assert torch.allclose(top_logprobs, ref_top, atol=1e-5)
    assert torch.allclose(raw.gather(-1, top_ids), ref_top, atol=1e-5)  # ids of those values (ties in any order)


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph():
    """Sampling with filters, penalties and logprobs captured once replays the eager tokens."""
    from capture_util import capture_outputs

    from myvllm.kernels.triton_sampling_filters import filtered_sample, token_logprobs

    n = 64
    gen = torch.Generator(device="cuda").manual_seed(6)
    logits = gpu_logits(n, torch.bfloat16, gen)
    p = gpu_params(n)
    pen = gpu_penalties(n, gen)
    seeds = torch.randint(0, 1 << 40, (n,), generator=gen, device="cuda")

    def step():
        tokens, stats = filtered_sample(logits, p["temperatures"], seeds, p["top_k"], p["top_p"], p["min_p"], pen, 5)
        return tokens, token_logprobs(logits, tokens, 5, stats)

    eager_tokens, eager_lp = step()
    graph, (tokens, lp) = capture_outputs(step)
    tokens.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(tokens, eager_tokens)
    assert torch.equal(lp[0], eager_lp[0]) and torch.equal(lp[1], eager_lp[1])
    seeds += 1  # new seeds, read by the replay: new draws, still inside the kept sets
    graph.replay()
    assert not torch.equal(tokens, eager_tokens)


@pytest.mark.gpu
def test_gpu_sampler_uses_the_kernels_with_penalties_and_logprobs():
    """The Sampler on the fused path: tokens inside the reference's kept sets, logprobs of the
    raw logits, the sampled tokens counted."""
    n = 32
    gen = torch.Generator(device="cuda").manual_seed(8)
    logits = gpu_logits(n, torch.bfloat16, gen)
    p = gpu_params(n)
    pen = gpu_penalties(n, gen)
    st = SamplingMetadata(all_greedy=False, top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"], num_logprobs=3,
                          fused_temperatures=p["temperatures"],
                          fused_seeds=torch.arange(2 * n, device="cuda").view(2, n),
                          output_counts=pen.output_counts.clone(), prompt_mask=pen.prompt_mask,
                          presence_penalties=pen.presence, frequency_penalties=pen.frequency,
                          repetition_penalties=pen.repetition)
    from myvllm.sample.sampler import apply_penalties

    y = apply_penalties(logits, st)
    out = Sampler()(logits, st, pass_index=1)
    assert reference_kept(y, p).gather(-1, out.token_ids[:, None]).all()
    raw = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(out.logprobs, raw.gather(-1, out.token_ids[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(out.top_logprobs, raw.topk(3, -1).values, atol=1e-5)
    rows = torch.arange(n, device="cuda")
    assert torch.equal(st.output_counts[rows, out.token_ids], pen.output_counts[rows, out.token_ids] + 1)


def test_the_builder_gives_the_kernels_only_batches_they_filter_from_candidates():
    """On the kernel path (as on CUDA): temperature, min-p, top-p and top_k <= the candidate limit
    go to the kernels; a row with a larger top_k sends its batch to the torch path."""
    from myvllm.runtime.sequence import Sequence
    from myvllm.sample.metadata import SamplingMetadataBuilder
    from myvllm.sampling_params import SamplingParams

    builder = SamplingMetadataBuilder(torch.device("cpu"), vocab_size=151936, seed=0)
    builder.kernels, builder.kernel_top_k_limit = True, 149

    def fused(*params: dict) -> bool:
        seqs = [Sequence(i, str(i), [1, 2], SamplingParams(**p)) for i, p in enumerate(params)]
        return builder.build(seqs).fused_seeds is not None

    qwen3 = dict(temperature=0.6, top_k=20, top_p=0.95)
    assert fused(qwen3, dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, min_p=0.1))
    assert fused(dict(temperature=0.6, top_k=149, top_p=0.5), dict(temperature=0.6, top_k=5))
    assert fused(qwen3, dict(temperature=1.0, top_p=0.9))
    assert not fused(qwen3, dict(temperature=1.0, top_k=150))
    assert fused(qwen3, dict(temperature=0.0, top_k=150))  # a greedy row filters nothing
    meta = builder.build([Sequence(0, "0", [1], SamplingParams(**qwen3))])
    assert meta.top_k.tolist() == [20] and meta.top_p.tolist() == [pytest.approx(0.95)] and meta.min_p is None


@pytest.mark.gpu
def test_gpu_greedy_with_penalties_takes_the_argmax_of_the_penalised_logits():
    from myvllm.sample.sampler import apply_penalties

    n = 64
    gen = torch.Generator(device="cuda").manual_seed(10)
    logits = gpu_logits(n, torch.bfloat16, gen)
    pen = gpu_penalties(n, gen)
    pen.output_counts[:, logits[0].float().topk(10).indices] = 3.0  # the penalties move the argmax
    st = SamplingMetadata(all_greedy=True, output_counts=pen.output_counts.clone(), prompt_mask=pen.prompt_mask,
                          presence_penalties=pen.presence, frequency_penalties=pen.frequency,
                          repetition_penalties=pen.repetition)
    expected = apply_penalties(logits, st).argmax(-1)
    assert torch.equal(Sampler()(logits, st).token_ids, expected)


@pytest.mark.gpu
def test_gpu_wide_nuclei_take_the_large_tile_or_bisection():
    """top_p alone over a head of 3000 likely tokens (more candidates than the small tile holds)
    and over a flat row (more than any tile holds: bisection)."""
    from myvllm.kernels import triton_sampling_filters as kernels

    gen = torch.Generator(device="cuda").manual_seed(11)
    logits = torch.randn(3, QWEN3_VOCAB, generator=gen, device="cuda")
    head = torch.randperm(QWEN3_VOCAB, generator=gen, device="cuda")[:3000]
    logits[:2, head] = 10 + 0.3 * torch.randn(2, 3000, generator=gen, device="cuda")
    logits[2] *= 0.3
    p = dict(temperatures=torch.tensor([1.0, 0.8, 1.0], device="cuda"),
             top_k=torch.full((3,), QWEN3_VOCAB, device="cuda"), top_p=torch.tensor([0.9, 0.6, 0.9], device="cuda"),
             min_p=torch.zeros(3, device="cuda"))
    seeds = torch.arange(3, device="cuda")
    _, thr, done, _ = kernels.thresholds_of(logits, p["temperatures"], seeds, None, p["top_p"], None, None, None)
    kept = logits >= key_to_float(thr)[:, None]
    assert done.tolist() == [1, 1, 0]
    assert kernels.CAP < int(kept[0].sum()) <= kernels.CAP_LARGE
    assert_kept_sets_agree(logits, thr, p, tol=1e-4)
    tokens, _ = kernels.filtered_sample(logits, p["temperatures"], seeds, None, p["top_p"], None)
    assert kept.gather(-1, tokens[:, None]).all()
