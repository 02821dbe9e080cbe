"""The `generation_config` engine argument: sampling defaults from generation_config.json.

Each test copies the tiny checkpoint and writes its own generation_config.json (the fixture's
holds only bos/eos ids, so it sets no sampling default). "auto" applies the file's sampling
keys, "vllm" ignores them, a folder path reads that folder's file; only keys present in the
file count; explicit SamplingParams (offline) and sent request fields (server) win.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import pytest
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams
from myvllm.config import EngineConfig
from myvllm.runtime import generation_defaults
from myvllm.runtime.generation_defaults import FILE_NAME, load_generation_defaults

ENGINE = dict(kvcache_block_size=16, max_model_len=256, enforce_eager=True, **SMALL_KV)
CUSTOM = dict(temperature=0.6, top_k=5, top_p=0.9, max_new_tokens=7)
CUSTOM_DEFAULTS = dict(temperature=0.6, top_k=5, top_p=0.9, max_tokens=7)
PROMPT = "the quick brown fox"
SP_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def write_generation_config(folder: str, **values) -> str:
    """Merge values into folder's generation_config.json (created if missing); returns folder."""
    file = os.path.join(folder, FILE_NAME)
    data = {}
    if os.path.isfile(file):
        with open(file) as f:
            data = json.load(f)
    data.update(values)
    os.makedirs(folder, exist_ok=True)
    with open(file, "w") as f:
        json.dump(data, f)
    return folder


def checkpoint_with(tiny_model_dir: str, dst, **values) -> str:
    """A copy of the tiny checkpoint whose generation_config.json also holds values."""
    shutil.copytree(tiny_model_dir, dst)
    return write_generation_config(str(dst), **values)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def custom_dir(tiny_model_dir, tmp_path_factory) -> str:
    return checkpoint_with(tiny_model_dir, tmp_path_factory.mktemp("gc") / "custom", **CUSTOM)


@pytest.fixture(scope="module")
def llm_auto(custom_dir, one_thread):
    return LLM(custom_dir, **ENGINE)


@pytest.fixture(scope="module")
def llm_vllm(custom_dir, one_thread):
    return LLM(custom_dir, generation_config="vllm", **ENGINE)


# ---- offline API -----------------------------------------------------------------------------------

def test_fixture_file_sets_no_sampling_default(tiny_model_dir):
    with open(os.path.join(tiny_model_dir, FILE_NAME)) as f:
        assert not set(json.load(f)) & set(generation_defaults.FIELD_OF_KEY)
    assert load_generation_defaults(EngineConfig(tiny_model_dir), tiny_model_dir) == {}


def test_auto_applies_the_model_file(llm_auto):
    assert llm_auto.engine.default_sampling == CUSTOM_DEFAULTS
    params = llm_auto.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.6, 5, 0.9, 7)
    assert params.min_p == 0.0 and params.n == 1  # not in the file: the neutral defaults
    again = llm_auto.get_default_sampling_params()
    assert again is not params and again == params  # a fresh object each call
    params.max_tokens = 99
    assert llm_auto.get_default_sampling_params().max_tokens == 7


def test_generate_and_chat_without_params_use_the_defaults(llm_auto):
    (out,) = llm_auto.generate(PROMPT, None, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    (out,) = llm_auto.generate([PROMPT], use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 7
    (chat,) = llm_auto.chat([{"role": "user", "content": "red green blue"}], None, use_tqdm=False)
    assert len(chat.outputs[0].token_ids) == 7 and chat.outputs[0].finish_reason == "length"


def test_default_sampling_fields_reach_the_sampler(tiny_model_dir, tmp_path, llm_vllm, one_thread):
    """top_k=1 from the file makes generate(None) greedy: the neutral defaults (temperature 1, no
    top-k) would not reproduce 12 greedy tokens."""
    path = checkpoint_with(tiny_model_dir, tmp_path / "topk1", top_k=1, max_new_tokens=12)
    llm = LLM(path, **ENGINE)
    (out,) = llm.generate(PROMPT, None, use_tqdm=False)
    (ref,) = llm_vllm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(out.outputs[0].token_ids) == 12 or out.outputs[0].finish_reason == "stop"


def test_explicit_sampling_params_are_used_as_is(llm_auto, llm_vllm):
    (out,) = llm_auto.generate(PROMPT, SamplingParams(ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 16  # SamplingParams' max_tokens, not the file's 7
    outs = llm_auto.generate([PROMPT, "blue"], [greedy(11), greedy(3)], use_tqdm=False)
    refs = llm_vllm.generate([PROMPT, "blue"], [greedy(11), greedy(3)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    assert [len(o.outputs[0].token_ids) for o in outs] == [11, 3]


def test_vllm_ignores_the_file(llm_vllm):
    assert llm_vllm.engine.default_sampling == {}
    assert llm_vllm.get_default_sampling_params() == SamplingParams()


def test_folder_path_loads_that_folders_file(tiny_model_dir, tmp_path, one_thread):
    folder = write_generation_config(str(tmp_path / "elsewhere"), temperature=0.3, max_new_tokens=5)
    for value in (folder, pathlib.Path(folder)):
        llm = LLM(tiny_model_dir, generation_config=value, **ENGINE)
        assert llm.engine.config.generation_config == folder
        assert llm.engine.default_sampling == dict(temperature=0.3, max_tokens=5)
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.max_tokens, params.top_k) == (0.3, 5, -1)
    (out,) = llm.generate(PROMPT, None, use_tqdm=False)
    assert len(out.outputs[0].token_ids) <= 5


def test_only_keys_present_in_the_file_count(tiny_model_dir, tmp_path):
    """transformers' GenerationConfig would say top_k=50 here; a value absent from the file is
    no default. A null counts as absent; do_sample is ignored, as in vLLM."""
    path = checkpoint_with(tiny_model_dir, tmp_path / "temp-only", temperature=0.6, top_p=None, do_sample=False)
    llm = LLM(path, **ENGINE)
    assert llm.engine.default_sampling == {"temperature": 0.6}
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.6, -1, 1.0, 16)


def test_every_mapped_key(tmp_path):
    folder = write_generation_config(str(tmp_path), temperature=0.5, top_k=20, top_p=0.95, min_p=0.05,
                                     repetition_penalty=1.1, max_new_tokens=64, num_beams=1, eos_token_id=[1, 2])
    defaults = load_generation_defaults(EngineConfig("x", generation_config=folder), None)
    expected = dict(temperature=0.5, top_k=20, top_p=0.95, min_p=0.05, repetition_penalty=1.1, max_tokens=64)
    assert defaults == {k: v for k, v in expected.items() if k in SP_FIELDS}


def test_a_key_without_a_sampling_params_field_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(generation_defaults.FIELD_OF_KEY, "typical_p", "typical_p")
    folder = write_generation_config(str(tmp_path), typical_p=0.9, temperature=0.4)
    with caplog.at_level(logging.WARNING, logger=generation_defaults.__name__):
        defaults = load_generation_defaults(EngineConfig("x", generation_config=folder), None)
    assert defaults == {"temperature": 0.4}
    assert "typical_p" in caplog.text


def test_dummy_models_have_no_file(tmp_path):
    config = EngineConfig("dummy:qwen3-0.6b", load_format="dummy")
    assert load_generation_defaults(config, None) == {}
    folder = write_generation_config(str(tmp_path), top_k=20)
    config = EngineConfig("dummy:qwen3-0.6b", load_format="dummy", generation_config=folder)
    assert load_generation_defaults(config, None) == {"top_k": 20}


def test_defaults_are_logged_once_at_start(custom_dir, caplog, one_thread):
    with caplog.at_level(logging.INFO, logger=generation_defaults.__name__):
        LLM(custom_dir, **ENGINE)
    lines = [r.getMessage() for r in caplog.records if r.name == generation_defaults.__name__]
    assert len(lines) == 1
    assert "Default sampling parameters from the model's generation_config.json" in lines[0]
    assert "'max_tokens': 7" in lines[0] and "generation_config='vllm'" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=generation_defaults.__name__):
        LLM(custom_dir, generation_config="vllm", **ENGINE)
    assert not [r for r in caplog.records if r.name == generation_defaults.__name__]


def test_bad_generation_config_values(tiny_model_dir, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"generation_config={missing!r}.*'auto' or 'vllm'"):
        LLM(tiny_model_dir, generation_config=missing, **ENGINE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"generation_config=.*{os.path.join(str(empty), FILE_NAME)}"):
        LLM(tiny_model_dir, generation_config=str(empty), **ENGINE)
    (empty / FILE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="generation_config: cannot read"):
        LLM(tiny_model_dir, generation_config=str(empty), **ENGINE)
    (empty / FILE_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="generation_config: .* must hold a JSON object"):
        LLM(tiny_model_dir, generation_config=str(empty), **ENGINE)
    write_generation_config(str(tmp_path / "bad-top-p"), top_p=0.0)
    with pytest.raises(ValueError, match="generation_config: .*top_p=0.0 is out of range"):
        LLM(tiny_model_dir, generation_config=str(tmp_path / "bad-top-p"), **ENGINE)
    write_generation_config(str(tmp_path / "bad-top-k"), top_k=2.5)
    with pytest.raises(ValueError, match="generation_config: .*top_k must be an int"):
        LLM(tiny_model_dir, generation_config=str(tmp_path / "bad-top-k"), **ENGINE)
    with pytest.raises(TypeError, match="generation_config must be 'auto', 'vllm' or a folder path, got int 3"):
        EngineConfig("x", generation_config=3)
    with pytest.raises(ValueError, match="generation_config=''"):
        EngineConfig("x", generation_config="")


# ---- server ----------------------------------------------------------------------------------------

def test_serve_flag():
    from myvllm.serve import parse_args

    assert parse_args(["--model", "m", "--generation-config", "vllm"])[1] == {"generation_config": "vllm"}
    assert parse_args(["--model", "m"])[1] == {}


@pytest.mark.parametrize("body, expected", [
    ({}, dict(temperature=0.6, top_k=5, top_p=0.9, max_tokens=7)),
    ({"temperature": 0, "top_k": 3, "max_tokens": 2}, dict(temperature=0, top_k=3, top_p=0.9, max_tokens=2)),
    ({"temperature": None, "top_p": None, "max_tokens": None}, dict(temperature=0.6, top_p=0.9, max_tokens=7)),
])
def test_request_fields_the_client_sent_win(body, expected):
    pytest.importorskip("fastapi")
    from myvllm.entrypoints.api_server import with_request_defaults
    from myvllm.entrypoints.openai_protocol import CompletionRequest, parse_request, sampling_params

    req = parse_request(CompletionRequest, {"model": "m", "prompt": "hi", **body})
    params = with_request_defaults(req, sampling_params(req, 512), CUSTOM_DEFAULTS)
    assert {k: getattr(params, k) for k in expected} == expected


def test_chat_max_completion_tokens_counts_as_sent():
    pytest.importorskip("fastapi")
    from myvllm.entrypoints.api_server import with_request_defaults
    from myvllm.entrypoints.openai_protocol import ChatCompletionRequest, parse_request, sampling_params

    messages = [{"role": "user", "content": "hi"}]
    for body, max_tokens in (({}, 7), ({"max_completion_tokens": 4}, 4), ({"max_tokens": 3}, 3)):
        req = parse_request(ChatCompletionRequest, {"model": "m", "messages": messages, **body})
        assert with_request_defaults(req, sampling_params(req, 512), CUSTOM_DEFAULTS).max_tokens == max_tokens


def test_server_uses_the_defaults_for_unset_fields(custom_dir, one_thread):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from myvllm.entrypoints.api_server import build_app
    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(custom_dir, **ENGINE)
    with TestClient(build_app(engine, "tiny")) as http:
        def complete(**body) -> dict:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "ignore_eos": True, **body})
            assert r.status_code == 200, r.text
            return r.json()

        assert complete()["usage"]["completion_tokens"] == 7
        assert complete(max_tokens=3)["usage"]["completion_tokens"] == 3
        r = http.post("/v1/chat/completions", json={"model": "tiny", "ignore_eos": True,
                                                    "messages": [{"role": "user", "content": "red green blue"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 7
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "min_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
