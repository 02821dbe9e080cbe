"""Greedy outputs equal transformers' Qwen3ForCausalLM token for token (float32, CPU),
under every scheduling situation the engine can get into."""

from __future__ import annotations

import pytest
import torch
from engine_utils import SHARED_PREFIX_PROMPTS, SMALL_KV, RunStats, run_checked
from tiny_model import greedy_reference, hf_greedy

from myvllm import LLM, SamplingParams

NUM_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, hf_tiny):
    """HF greedy continuations of PROMPTS and of prompts sharing long prefixes."""
    return greedy_reference(tiny_model_dir, hf_tiny, SHARED_PREFIX_PROMPTS, NUM_TOKENS)


def check_equal(outputs, expected):
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}: {out.outputs[0].token_ids} != {ref}"
        assert out.outputs[0].finish_reason == "length"


def test_prompt_lengths_vary(reference):
    ids, _ = reference
    lengths = sorted(len(p) for p in ids)
    assert len(ids) >= 8 and lengths[0] <= 2 and lengths[-1] > 40


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_transformers(tiny_model_dir, reference, block_size, prefix_caching):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=block_size, enable_prefix_caching=prefix_caching, **SMALL_KV)
    check_equal(run_checked(llm, ids, GREEDY), expected)
    # The second pass finds the first pass's blocks in the prefix cache.
    check_equal(run_checked(llm, ids, GREEDY), expected)
    hits = llm.engine.block_manager.num_hits
    assert (hits > 0) == (prefix_caching and block_size == 16)


def test_prefix_cache_hits_are_reported(tiny_model_dir, reference):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    first = run_checked(llm, ids[-3:], GREEDY)
    second = run_checked(llm, ids[-3:], GREEDY)
    assert all(o.num_cached_tokens == 0 for o in first[:1])
    assert all(o.num_cached_tokens >= 16 for o in second)
    check_equal(second, expected[-3:])


def test_chunked_prefill_and_mixed_batches(tiny_model_dir, reference):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=16, max_num_batched_tokens=7, **SMALL_KV)
    stats = RunStats()
    check_equal(run_checked(llm, ids, GREEDY, stats), expected)
    assert stats.chunked_steps > 0, "no prompt was chunked"
    assert stats.mixed_steps > 0, "no step mixed decodes and prefill chunks"


def test_preemption_by_recompute(tiny_model_dir, reference):
    ids, expected = reference
    # 8 blocks of 16 tokens: one max-length sequence fits, all of them together do not.
    llm = LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=128, num_kv_blocks=8,
              dtype="float32", device="cpu")
    check_equal(run_checked(llm, ids, GREEDY), expected)
    assert llm.engine.get_stats()["num_preemptions"] > 0, "the tiny pool forced no preemption"


@pytest.mark.parametrize("steps", [1, 3])
def test_scheduler_steps_do_not_change_outputs(tiny_model_dir, reference, steps):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=16, num_decode_passes=steps, **SMALL_KV)
    check_equal(run_checked(llm, ids, GREEDY), expected)


def test_max_num_seqs_one(tiny_model_dir, reference):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=16, max_num_seqs=1, **SMALL_KV)
    stats = RunStats()
    check_equal(run_checked(llm, ids[:4], GREEDY, stats), expected[:4])
    assert stats.max_batch == 1


def test_logprobs_equal_log_softmax_of_transformers_logits(tiny_model_dir, hf_tiny):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    tok = llm.get_tokenizer()
    prompts = ["the quick brown fox", "seven wizards"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, logits = hf_greedy(hf_tiny, tok.encode(prompt), 8)
        comp = out.outputs[0]
        assert comp.token_ids == tokens
        assert len(comp.logprobs) == 8
        total = 0.0
        for token, step_logits, entry in zip(tokens, logits, comp.logprobs):
            ref = torch.log_softmax(step_logits.double(), dim=-1)
            top = ref.topk(5)
            assert set(entry) >= set(top.indices.tolist())
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref[tid].item()) < 1e-4
            assert entry[token].rank == 1
            total += ref[token].item()
        assert abs(comp.cumulative_logprob - total) < 1e-3


def test_n_samples_and_seeded_sampling(tiny_model_dir):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate(["the quick brown fox"], params, use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [c.index for c in a.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1, "n samples with different seeds all agree"
    # Same request inside a bigger, different batch: the seeded samples do not change.
    others = ["a lazy dog", "blue", "numbers like one two"]
    mixed = llm.generate(others + ["the quick brown fox"],
                         [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 3 + [params],
                         use_tqdm=False)[-1]
    assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in a.outputs]


def test_eos_stops_generation(tiny_model_dir, reference):
    ids, expected = reference
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    # Make the 5th greedy token of prompt 1 a stop token: generation ends right there.
    stop_at = expected[1][4]
    first = expected[1].index(stop_at)
    out = llm.generate([ids[1]], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected[1][:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


@pytest.mark.parametrize("steps, lengths", [(1, [1, 2, 3, 4, 5, 6]), (4, [1, 5, 6])])
def test_streaming_outputs_grow_until_finished(tiny_model_dir, steps, lengths):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, num_decode_passes=steps, **SMALL_KV)
    engine = llm.engine
    rid = engine.add_request("the quick brown fox", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                             stream=True)
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append(out)
    assert [len(o.outputs[0].token_ids) for o in seen] == lengths
    assert [o.finished for o in seen] == [False] * (len(lengths) - 1) + [True]
    final = llm.generate(["the quick brown fox"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                         use_tqdm=False)[0]
    assert seen[-1].outputs[0].token_ids == final.outputs[0].token_ids
    assert seen[-1].outputs[0].text == final.outputs[0].text
    assert final.outputs[0].text.startswith(seen[1].outputs[0].text)


def test_chat_applies_the_template(tiny_model_dir):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "the quick brown fox"}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    for thinking in (None, False):
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kwargs)
        expected = llm.generate([tok.encode(text, add_special_tokens=False)], params, use_tqdm=False)[0]
        out = llm.chat(conv, params, use_tqdm=False, enable_thinking=thinking)[0]
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids
        assert out.prompt_token_ids == expected.prompt_token_ids
        assert ("<think>" in out.prompt) == (thinking is False)
    both = llm.chat([conv, conv + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]],
                    params, use_tqdm=False)
    assert len(both) == 2 and len(both[1].prompt_token_ids) > len(both[0].prompt_token_ids)
