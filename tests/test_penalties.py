"""Presence, frequency and repetition penalties: the sampler against a plain loop, and the
engine's greedy tokens against transformers' repetition penalty and a step-by-step reference
for the OpenAI penalties, within decode batches of several passes and with preemption."""

from __future__ import annotations

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, run_checked

from myvllm import LLM, SamplingParams
from myvllm.sample.metadata import SamplingMetadata
from myvllm.sample.sampler import Sampler, apply_penalties

NUM_TOKENS = 24


def reference_penalties(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]],
                        presence: list[float], frequency: list[float], repetition: list[float]) -> torch.Tensor:
    """The definitions, token by token."""
    out = logits.clone()
    for i in range(logits.shape[0]):
        for t in set(prompts[i]) | set(outputs[i]):
            out[i, t] = out[i, t] / repetition[i] if out[i, t] > 0 else out[i, t] * repetition[i]
        for t in set(outputs[i]):
            out[i, t] -= frequency[i] * outputs[i].count(t) + presence[i]
    return out


def test_apply_penalties_matches_the_definitions():
    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, generator=g) * 3
    prompts, outputs = [[1, 2, 2, 7], [], [40, 41]], [[2, 3, 3, 3], [9], []]
    presence, frequency, repetition = [0.5, -1.0, 2.0], [0.3, 0.0, 1.5], [1.3, 1.0, 0.7]
    counts = torch.zeros(3, vocab)
    prompt_mask = torch.zeros(3, vocab, dtype=torch.bool)
    for i in range(3):
        for t in outputs[i]:
            counts[i, t] += 1
        prompt_mask[i, prompts[i]] = True
    meta = SamplingMetadata(all_greedy=True, output_counts=counts, prompt_mask=prompt_mask,
                            presence_penalties=torch.tensor(presence), frequency_penalties=torch.tensor(frequency),
                            repetition_penalties=torch.tensor(repetition))
    expected = reference_penalties(logits, prompts, outputs, presence, frequency, repetition)
    torch.testing.assert_close(apply_penalties(logits, meta), expected)


def test_the_sampler_counts_each_pass_and_leaves_the_logits_alone():
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]])
    before = logits.clone()
    meta = SamplingMetadata(all_greedy=True, output_counts=torch.zeros(1, 4), presence_penalties=torch.tensor([1.0]),
                            frequency_penalties=torch.tensor([0.0]), repetition_penalties=torch.tensor([1.0]))
    first = Sampler()(logits, meta).token_ids
    second = Sampler()(logits, meta).token_ids
    assert first.tolist() == [1] and second.tolist() == [2], "the second pass sees the first pass's token"
    assert meta.output_counts.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert torch.equal(logits, before)


@pytest.mark.parametrize("name,value,words", [
    ("presence_penalty", 2.5, "presence_penalty=2.5 is out of range: must be in [-2, 2]"),
    ("frequency_penalty", -3, "frequency_penalty=-3 is out of range: must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty=0.0 is out of range: must be a finite number > 0"),
])
def test_penalties_out_of_range(name, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{name: value})


def test_penalties_of_the_wrong_type():
    with pytest.raises(TypeError, match="presence_penalty must be a number"):
        SamplingParams(presence_penalty="1")


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok.encode(p) for p in PROMPTS[:6]]


def hf_reference(model, prompt: list[int], num_tokens: int, presence: float, frequency: float,
                 repetition: float) -> list[int]:
    """Greedy tokens of the transformers model with the penalties applied to each step's logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1:].float()
            out = ids[len(prompt):]
            logits = reference_penalties(logits, [prompt], [out], [presence], [frequency], [repetition])
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("engine_kw", [dict(num_decode_passes=1), dict(num_decode_passes=8),
                                       dict(num_decode_passes=4, num_kv_blocks=6, max_model_len=96)],
                         ids=["one-pass", "eight-passes", "preempting"])
def test_greedy_with_penalties_matches_the_reference(tiny_model_dir, hf_tiny, prompt_ids, engine_kw):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **{**SMALL_KV, **engine_kw})
    settings = [(0.0, 0.0, 1.3), (0.8, 0.4, 1.0), (-0.5, 0.6, 0.8), (0.0, 0.0, 1.0)]
    params, expected = [], []
    for i, prompt in enumerate(prompt_ids):
        presence, frequency, repetition = settings[i % len(settings)]
        params.append(SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, presence_penalty=presence,
                                     frequency_penalty=frequency, repetition_penalty=repetition))
        expected.append(hf_reference(hf_tiny, prompt, NUM_TOKENS, presence, frequency, repetition))
    outs = run_checked(llm, [{"prompt_token_ids": p} for p in prompt_ids], params)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} ({settings[i % len(settings)]})"
    if "num_kv_blocks" in engine_kw:
        assert llm.engine.get_stats()["num_preemptions"] > 0, "the tiny pool forced no preemption"
    assert expected[0] != hf_reference(hf_tiny, prompt_ids[0], NUM_TOKENS, 0.0, 0.0, 1.0), \
        "the repetition penalty changes nothing on this prompt: the test would not see it"


def test_repetition_penalty_equals_transformers_generate(tiny_model_dir, hf_tiny, prompt_ids):
    llm = LLM(tiny_model_dir, kvcache_block_size=16, **SMALL_KV)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, repetition_penalty=1.5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    for prompt, out in zip(prompt_ids, outs):
        hf = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                              do_sample=False, repetition_penalty=1.5)
        assert out.outputs[0].token_ids == hf[0, len(prompt):].tolist()


def test_seeded_sampling_with_penalties_is_the_same_scheduled_ahead_or_not(tiny_model_dir, prompt_ids):
    """Batches scheduled ahead count the tokens still in flight on the device: the draws equal
    those of the engine that reads every batch back first."""
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=NUM_TOKENS, ignore_eos=True, presence_penalty=1.0,
                             frequency_penalty=0.5, repetition_penalty=1.2) for i in range(len(prompt_ids))]
    runs = []
    for ahead in (True, False):
        llm = LLM(tiny_model_dir, kvcache_block_size=16, num_decode_passes=4, async_scheduling=ahead, **SMALL_KV)
        outs = run_checked(llm, [{"prompt_token_ids": p} for p in prompt_ids], params)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]
