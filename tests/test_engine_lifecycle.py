"""An engine's limits and life: n bounded by max_n, the max_tokens cap said once, the device
memory freed by `del llm` / `llm.shutdown()` so that a next engine fits."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(tiny_model_dir, max_model_len=64, max_n=4, **SMALL_KV)


def test_n_above_max_n_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match=r"n=10000 is out of range: must be <= max_n=4"):
        llm.generate(["the quick"], SamplingParams(n=10000), use_tqdm=False)
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    out = llm.generate(["the quick"], SamplingParams(n=4, max_tokens=2, temperature=0.8, seed=1), use_tqdm=False)
    assert len(out[0].outputs) == 4


def test_max_n_is_an_engine_argument(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_n=0 is out of range"):
        LLM(tiny_model_dir, max_n=0, **SMALL_KV)


def test_max_tokens_beyond_max_model_len_is_logged_once(llm, caplog):
    llm.engine.processor._told_length_cap = False
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="myvllm.runtime.input_processor"):
        outs = llm.generate(["the quick brown fox", "a lazy dog"], params, use_tqdm=False)
        llm.generate(["blue"], params, use_tqdm=False)
    said = [r.getMessage() for r in caplog.records if "max_model_len=64" in r.getMessage()]
    assert len(said) == 1 and "max_tokens=500" in said[0] and "finish_reason 'length'" in said[0]
    for out in outs:
        assert out.outputs[0].finish_reason == "length"
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64


def test_del_llm_frees_the_model_without_a_gc_call(tiny_model_dir):
    llm = LLM(tiny_model_dir, **SMALL_KV)
    model = weakref.ref(llm.engine.runner.model)
    cache = weakref.ref(llm.engine.runner.kv_cache)
    gc.disable()  # the engine must not depend on a collection running by chance
    try:
        del llm
        assert model() is None and cache() is None
    finally:
        gc.enable()


def test_a_shut_down_llm_refuses_to_generate(tiny_model_dir):
    llm = LLM(tiny_model_dir, **SMALL_KV)
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert llm.engine.runner.model is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(["the"], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["del", "shutdown"])
def test_a_second_engine_fits_after_the_first_is_gone(tiny_model_dir, how):
    """Each engine takes gpu_memory_utilization of the card for its KV cache: a second one only
    fits once the first has given its memory back."""
    kw = dict(gpu_memory_utilization=0.8, max_model_len=256, kvcache_block_size=16)
    params = SamplingParams(max_tokens=4, temperature=0)
    first = LLM(tiny_model_dir, **kw)
    expected = first.generate(["the quick brown fox"], params, use_tqdm=False)[0].outputs[0].token_ids
    used = torch.cuda.memory_reserved()
    if how == "del":
        del first
    else:
        first.shutdown()
    assert torch.cuda.memory_reserved() < used / 4, "the first engine's memory is still held"
    second = LLM(tiny_model_dir, **kw)
    assert second.generate(["the quick brown fox"], params, use_tqdm=False)[0].outputs[0].token_ids == expected
    second.shutdown()
