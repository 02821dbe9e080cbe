"""Constrained sequences inside multi-pass decode windows, scheduled ahead: their grammars advance
pass by pass on the host, so their outputs equal those of one pass per step without scheduling
ahead, token for token (greedy and seeded), where the grammar ends inside a window too, and the
unconstrained requests beside them come out equal as well; the window is not cut to one pass."""

from __future__ import annotations

import json
import re

import pytest
from engine_utils import SMALL_KV, RunStats, run_checked

from myvllm import LLM, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                    "maxItems": 3},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "tags", "age"], "additionalProperties": False}
DIGITS = r"[0-9]{45}"  # 45 digit tokens, then the stop token: the grammar ends inside a window of 8


def make_llm(tiny_model_dir: str, passes: int, ahead: bool) -> LLM:
    return LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=256, num_decode_passes=passes,
               async_scheduling=ahead, **SMALL_KV)


@pytest.fixture(scope="module")
def llms(tiny_model_dir, one_thread):
    return make_llm(tiny_model_dir, 8, True), make_llm(tiny_model_dir, 1, False)


def constrained(spec: StructuredOutputsParams, **kw) -> SamplingParams:
    return SamplingParams(structured_outputs=spec, **{"max_tokens": 100, **kw})


PROMPTS = ["the quick brown fox", "a lazy dog", "seven wizards quietly judge", "blue", "one two three",
           "people talk about weather", "mountains where people talk"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    constrained(StructuredOutputsParams(json=SCHEMA), temperature=0),
    SamplingParams(temperature=1.0, seed=11, max_tokens=37, ignore_eos=True),
    constrained(StructuredOutputsParams(json=SCHEMA), temperature=1.0, seed=3, n=2),
    constrained(StructuredOutputsParams(regex=DIGITS), temperature=0.8, seed=5, ignore_eos=True),
    constrained(StructuredOutputsParams(json_object=True), temperature=1.0, seed=9, max_tokens=29),
    constrained(StructuredOutputsParams(choice=["red wine", "blue cheese", "green tea"]), temperature=0),
]


def completions(outputs):
    return [(c.token_ids, c.finish_reason) for o in outputs for c in o.outputs]


def test_windowed_constrained_outputs_equal_single_pass(llms):
    windowed, single = llms
    expected = run_checked(single, PROMPTS, PARAMS)
    stats = RunStats()
    got = run_checked(windowed, PROMPTS, PARAMS, stats)
    assert completions(got) == completions(expected)
    # the constraints hold (the tiny random model alone would not follow them)
    for c in got[1].outputs + got[3].outputs:
        value = json.loads(c.text)
        assert set(value) == {"name", "tags", "age"} and re.fullmatch("[a-z]{1,8}", value["name"]), c.text
    (digits,) = got[4].outputs
    assert re.fullmatch(DIGITS, digits.text) and digits.finish_reason == "stop"
    assert len(digits.token_ids) == 46 and len(digits.token_ids) % 8 not in (0, 1)  # it ends mid-window
    assert got[6].outputs[0].text in ("red wine", "blue cheese", "green tea")
    # 46 tokens of the longest request: one per step would take 46 steps
    assert stats.steps <= 12, stats


def test_a_constrained_sequence_alone_keeps_its_windows(llms):
    windowed, single = llms
    params = constrained(StructuredOutputsParams(regex=DIGITS), temperature=0)
    expected = run_checked(single, ["seven wizards"], params)
    stats = RunStats()
    got = run_checked(windowed, ["seven wizards"], params, stats)
    assert completions(got) == completions(expected)
    # prefill (token 1), windows of 8 passes over tokens 2..46, and the one scheduled ahead of the
    # last before its stop token was seen (its tokens are dropped); one pass per step would take 46
    assert stats.steps == 1 + -(-45 // 8) + 1, stats


def test_a_grammar_takes_each_token_once_and_stops_where_it_terminated(llms):
    windowed, _ = llms
    structured = windowed.engine.structured
    grammar = structured.grammar(StructuredOutputsParams(choice=["ab"]))
    tok = windowed.engine.tokenizer
    ids = tok.encode("ab", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    for i, t in enumerate(ids):
        grammar.accept(i, t)
        grammar.accept(i, t)  # brought a second time (the batch read back after the window took it)
    assert grammar.num_accepted == len(ids) and grammar.terminated_at == len(ids)
    assert not grammar.stops(len(ids) - 1) and grammar.stops(len(ids))
    grammar.accept(len(ids), ids[0])  # a pass after the end: ignored
    assert grammar.num_accepted == len(ids)


def test_a_grammar_that_starts_after_a_text_is_free_until_it(llms):
    windowed, _ = llms
    tok = windowed.engine.tokenizer
    grammar = windowed.engine.structured.grammar(StructuredOutputsParams(choice=["ab"], starts_after="wizards"))
    free = tok.encode("seven blue", add_special_tokens=False)
    start = tok.encode("wizards", add_special_tokens=False)
    ab = tok.encode("ab", add_special_tokens=False)
    tokens = free + start + ab
    for i, t in enumerate(free + start):
        assert grammar.constrains is False
        grammar.accept(i, t)  # anything goes: the matcher takes none of these
    assert grammar.constrains
    for i, t in enumerate(ab, len(free + start)):
        grammar.accept(i, t)
    grammar.accept(len(tokens), tok.convert_tokens_to_ids("<|im_end|>"))
    assert grammar.terminated_at == len(tokens) + 1


def test_tensor_parallel_constrained_windows_equal_one_rank(llms, tiny_model_dir):
    _, single = llms
    params = [constrained(StructuredOutputsParams(regex=DIGITS), temperature=0),
              constrained(StructuredOutputsParams(json=SCHEMA), temperature=1.0, seed=3),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    prompts = PROMPTS[:3]
    expected = run_checked(single, prompts, params)
    tp = LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=256, num_decode_passes=8,
             tensor_parallel_size=2, **SMALL_KV)
    try:
        stats = RunStats()
        assert completions(run_checked(tp, prompts, params, stats)) == completions(expected)
        assert stats.steps <= 10, stats  # windows of 8 passes over the 46 digit tokens
    finally:
        tp.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_constrained_windows_equal_single_pass(tiny_model_dir, enforce_eager):
    """On CUDA (graphs or eager, the fused sampler, pinned copies and events between passes),
    float32: windowed and scheduled ahead equals one pass per step."""
    cuda = dict(kvcache_block_size=16, max_model_len=256, dtype="float32", gpu_memory_utilization=0.3,
                enforce_eager=enforce_eager)
    single = LLM(tiny_model_dir, num_decode_passes=1, async_scheduling=False, **cuda)
    expected = run_checked(single, PROMPTS, PARAMS)
    single.shutdown()
    windowed = LLM(tiny_model_dir, num_decode_passes=8, async_scheduling=True, **cuda)
    stats = RunStats()
    got = run_checked(windowed, PROMPTS, PARAMS, stats)
    windowed.shutdown()
    assert completions(got) == completions(expected)
    for c in got[1].outputs + got[3].outputs:
        assert set(json.loads(c.text)) == {"name", "tags", "age"}, c.text
    assert re.fullmatch(DIGITS, got[4].outputs[0].text)
    assert stats.steps <= 12, stats
