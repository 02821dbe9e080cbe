"""prompt_logprobs: the logprob of every prompt token after the first (and the top-k there),
against transformers' log-softmax of the same prompt, through chunked prefill, preemption,
n > 1 and a prefix that is cached for other requests."""

from __future__ import annotations

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, run_checked

from myvllm import LLM, SamplingParams

K = 3


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok.encode(p) for p in PROMPTS]
    return ids + [ids[5] + ids[2]]  # shares the long prompt 5 as a prefix


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: log-softmax at each position, the distribution of the next token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(out, prompt: list[int], hf_model, k: int) -> None:
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt), (len(entries or ()), len(prompt))
    assert entries[0] is None
    ref = hf_prompt_logprobs(hf_model, prompt)
    for pos, (entry, token) in enumerate(zip(entries[1:], prompt[1:])):
        row = ref[pos]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4), f"position {pos + 1}"
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4) and entry[tid].rank == rank
        assert set(entry) <= set(top.indices.tolist()) | {token}


@pytest.mark.parametrize("engine_kw", [dict(), dict(max_num_batched_tokens=16),
                                       dict(num_kv_blocks=6, max_model_len=96, max_num_batched_tokens=32)],
                         ids=["whole", "chunked", "preempting"])
def test_prompt_logprobs_match_transformers(tiny_model_dir, hf_tiny, prompt_ids, engine_kw):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **{**SMALL_KV, **engine_kw})
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=K)
    outs = run_checked(llm, [{"prompt_token_ids": p} for p in prompt_ids], params)
    for prompt, out in zip(prompt_ids, outs):
        check(out, prompt, hf_tiny, K)
    if "num_kv_blocks" in engine_kw:
        assert llm.engine.get_stats()["num_preemptions"] > 0, "the tiny pool forced no preemption"


def test_a_cached_prefix_is_still_computed_for_prompt_logprobs(tiny_model_dir, hf_tiny, prompt_ids):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    plain = SamplingParams(temperature=0, max_tokens=2)
    llm.generate([{"prompt_token_ids": prompt_ids[5]}], plain, use_tqdm=False)  # caches its blocks
    asked = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, n=2, seed=3)
    (out,) = llm.generate([{"prompt_token_ids": prompt_ids[-1]}], asked, use_tqdm=False)
    assert out.num_cached_tokens == 0
    check(out, prompt_ids[-1], hf_tiny, 0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:]), "k=0: the prompt token's entry only"
    (again,) = llm.generate([{"prompt_token_ids": prompt_ids[-1]}], plain, use_tqdm=False)
    assert again.num_cached_tokens > 0 and again.prompt_logprobs is None


def test_prompt_logprobs_bounds(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_logprobs=4, **SMALL_KV)
    with pytest.raises(ValueError, match=r"prompt_logprobs=5 is out of range: must be <= max_logprobs=4"):
        llm.generate(["the"], SamplingParams(prompt_logprobs=5), use_tqdm=False)
    with pytest.raises(TypeError, match="prompt_logprobs must be None or an int"):
        SamplingParams(prompt_logprobs=True)
