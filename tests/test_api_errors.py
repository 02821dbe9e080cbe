"""Bad input gets a clear error naming the field, and the engine keeps working afterwards."""

from __future__ import annotations

import math

import pytest
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams
from myvllm.config import EngineConfig

MAX_LEN = 64


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=MAX_LEN, **SMALL_KV)


GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(temperature=math.inf), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-2), ValueError, "top_k"),
        (dict(top_k=1.5), TypeError, "top_k must be an int"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=1.1), ValueError, "min_p"),
        (dict(max_tokens=0), ValueError, "max_tokens"),
        (dict(min_tokens=5, max_tokens=4), ValueError, "min_tokens"),
        (dict(stop=3), TypeError, "stop"),
        (dict(stop=["a", 3]), TypeError, "stop"),
        (dict(n=0), ValueError, "n="),
        (dict(logprobs=-1), ValueError, "logprobs"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_sampling_params_validation(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        SamplingParams(**kwargs)


def test_valid_sampling_params_edge_values():
    SamplingParams(top_k=0)
    SamplingParams(top_k=-1, top_p=1.0, min_p=0.0, temperature=0.0)
    SamplingParams(min_p=1.0, stop=["x", "y"])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(gpu_memory_utilization=0.0), ValueError, "gpu_memory_utilization"),
        (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
        (dict(kvcache_block_size=24), ValueError, "kvcache_block_size"),
        (dict(kvcache_block_size=8), ValueError, "kvcache_block_size"),
        (dict(kvcache_block_size=512), ValueError, "kvcache_block_size"),
        (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
        (dict(max_num_batched_tokens=0), ValueError, "max_num_batched_tokens"),
        (dict(dtype="int8"), ValueError, "dtype"),
        (dict(load_format="pt"), ValueError, "load_format"),
        (dict(attention_backend="magic"), ValueError, "attention_backend"),
        (dict(device="tpu"), ValueError, "device"),
        (dict(enforce_eager="yes"), TypeError, "enforce_eager"),
    ],
)
def test_engine_config_validation(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        EngineConfig(model="x", **kwargs)


def test_unknown_engine_argument_is_named(tiny_model_dir):
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(tiny_model_dir, max_num_sequences=4, **SMALL_KV)


def test_missing_model_path_says_no_such_directory(tmp_path):
    with pytest.raises(ValueError, match="no such directory") as info:
        LLM(str(tmp_path / "nope" / "model"), **SMALL_KV)
    assert str(info.value).startswith("model=") and "download_model.py" not in str(info.value)


@pytest.mark.parametrize(
    "prompts, exc, words",
    [
        ([""], ValueError, "empty"),
        ([[]], ValueError, "empty"),
        ([[1, -1]], ValueError, r"\[0, 511\]"),
        ([[1, 512]], ValueError, r"\[0, 511\]"),
        ([[1, 2.5]], TypeError, "ints"),
        ([b"bytes"], TypeError, "bytes"),
        (b"bytes", TypeError, "bytes"),
        ([["a", "b"]], TypeError, "prompt 0"),
        (None, TypeError, "NoneType"),
        ([None], TypeError, "NoneType"),
        ([list(range(MAX_LEN))], ValueError, "max_model_len=64"),
        ([{"tokens": [1]}], ValueError, "prompt_token_ids"),
    ],
)
def test_bad_prompts_raise_and_engine_survives(llm, prompts, exc, words):
    with pytest.raises(exc, match=words):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_prompt_among_good_ones_queues_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate([[1, 2], [3, 999], [4]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_params_list_length_must_match(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate([[1], [2], [3]], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1]], {"temperature": 0}, use_tqdm=False)


def test_logprobs_over_max_logprobs(llm):
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate([[1]], SamplingParams(logprobs=100), use_tqdm=False)


def test_prompt_plus_max_tokens_beyond_max_model_len_stops_with_length(llm):
    prompt = list(range(1, MAX_LEN - 3))  # 60 tokens: room for 4 more
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == MAX_LEN - len(prompt)
    assert out.finish_reason == "length"


def test_text_prompt_without_tokenizer(tiny_model_dir):
    llm = LLM(tiny_model_dir, skip_tokenizer_init=True, **SMALL_KV)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""


def test_request_params_are_not_mutated(llm):
    params = SamplingParams(temperature=0, max_tokens=3, stop=["zzz"], n=2)
    before = repr(params)
    llm.generate([[1, 2]], params, use_tqdm=False)
    assert repr(params) == before


def test_abort_keeps_engine_usable(llm):
    engine = llm.engine
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    out = engine.abort_request(rid)
    assert out.outputs[0].finish_reason == "abort"
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert llm.generate([[1]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"
