"""Penalties and prompt_logprobs through the OpenAI server (in process), equal to the offline API."""

from __future__ import annotations

import pytest
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams

PROMPT = "the quick brown fox jumps over a lazy dog while seven wizards"
ENGINE = dict(kvcache_block_size=16, max_model_len=128, **SMALL_KV)


@pytest.fixture(scope="module")
def http(tiny_model_dir, one_thread):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from myvllm.entrypoints.api_server import build_app
    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(tiny_model_dir, generation_config="vllm", **ENGINE)
    with TestClient(build_app(engine, "tiny")) as client:
        yield client


def complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "ignore_eos": True, "max_tokens": 12,
                                           "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_penalties_reach_the_sampler(http, tiny_model_dir):
    llm = LLM(tiny_model_dir, generation_config="vllm", **ENGINE)
    kw = dict(presence_penalty=1.2, frequency_penalty=0.5, repetition_penalty=1.4)
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw),
                            use_tqdm=False)[0].outputs[0].text
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].text
    assert expected != plain, "the penalties change nothing here: the test would not see them"
    assert complete(http, **kw)["text"] == expected
    assert complete(http)["text"] == plain


def test_prompt_logprobs_in_the_completion(http, tiny_model_dir):
    llm = LLM(tiny_model_dir, generation_config="vllm", **ENGINE)
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2),
                          use_tqdm=False)
    got = complete(http, prompt_logprobs=2)["prompt_logprobs"]
    assert len(got) == len(out.prompt_token_ids) and got[0] is None
    for entry, ref, token in zip(got[1:], out.prompt_logprobs[1:], out.prompt_token_ids[1:]):
        assert {int(t) for t in entry} == set(ref)
        assert entry[str(token)]["logprob"] == pytest.approx(ref[token].logprob, abs=1e-5)
        assert entry[str(token)]["rank"] == ref[token].rank and isinstance(entry[str(token)]["decoded_token"], str)
    assert "prompt_logprobs" not in complete(http)


def test_streamed_prompt_logprobs_come_in_each_choices_first_chunk(http):
    import json

    whole = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "ignore_eos": True,
                                               "max_tokens": 12, "n": 2, "temperature": 0.8, "seed": 3,
                                               "prompt_logprobs": 2}).json()["choices"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "ignore_eos": True, "max_tokens": 12,
                                           "n": 2, "temperature": 0.8, "seed": 3, "prompt_logprobs": 2,
                                           "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    by_choice: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_choice.setdefault(choice["index"], []).append(choice)
    assert sorted(by_choice) == [0, 1]
    for index, choices in by_choice.items():
        assert choices[0]["prompt_logprobs"] == whole[index]["prompt_logprobs"]
        assert all("prompt_logprobs" not in c for c in choices[1:])


@pytest.mark.parametrize("body,field", [(dict(presence_penalty=3), "presence_penalty"),
                                        (dict(prompt_logprobs=1000), "prompt_logprobs")])
def test_bad_sampling_fields_are_400s_naming_the_field(http, body, field):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
