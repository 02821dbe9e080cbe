"""Structured outputs (xgrammar): whatever the tiny random model prefers, a constrained output
follows its JSON schema, regex, choice or grammar, greedy and sampled, beside unconstrained
requests that come out as they would alone; compile errors name the field."""

from __future__ import annotations

import json
import re

import pytest
from engine_utils import SMALL_KV, in_process_server, run_checked

from myvllm import LLM, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=256, **SMALL_KV)


def generate(llm, spec: StructuredOutputsParams, **kw):
    params = SamplingParams(max_tokens=120, structured_outputs=spec, **{"temperature": 0, **kw})
    return llm.generate(["the quick brown fox"], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema(llm, temperature):
    for c in generate(llm, StructuredOutputsParams(json=SCHEMA), temperature=temperature, n=2, seed=1):
        value = json.loads(c.text)
        assert set(value) == {"name", "age"} and re.fullmatch("[a-z]{1,8}", value["name"]) and 0 <= value["age"] <= 99
        assert c.finish_reason == "stop"


def test_json_object_regex_choice_and_grammar(llm):
    # an open object can go on as long as the random model likes; cut by max_tokens or not, the
    # output is one the grammar of a JSON object accepts token by token, and opens an object
    spec = StructuredOutputsParams(json_object=True)
    for c in generate(llm, spec, temperature=1.0, n=3, seed=7):
        assert c.text.startswith("{")
        matcher = llm.engine.structured.matcher(spec)
        assert all(matcher.accept_token(t) for t in c.token_ids)
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text, strict=False), dict)  # xgrammar lets control chars into strings
    (c,) = generate(llm, StructuredOutputsParams(regex=r"[a-c]{3}-[0-9]{2}"), temperature=1.0, seed=5)
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", c.text), c.text
    (c,) = generate(llm, StructuredOutputsParams(choice=["red wine", "blue cheese", "green tea"]), temperature=1.0,
                    seed=2)
    assert c.text in ("red wine", "blue cheese", "green tea")
    (c,) = generate(llm, StructuredOutputsParams(grammar='root ::= "yes" | "no" " " [0-9]'))
    assert re.fullmatch(r"yes|no [0-9]", c.text), c.text


def test_unconstrained_requests_in_the_same_batch_lose_nothing(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["a lazy dog", "seven wizards"], free, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    mixed = run_checked(llm, ["a lazy dog", "the quick brown fox", "seven wizards"], [free, constrained, free])
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
    json.loads(mixed[1].outputs[0].text)


def test_bad_specs_name_the_field(llm):
    with pytest.raises(ValueError, match=r"structured_outputs: the JSON schema does not compile"):
        generate(llm, StructuredOutputsParams(json='{"type": "object", "properties": 3}'))
    with pytest.raises(ValueError, match=r"structured_outputs: the regex does not compile"):
        generate(llm, StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(TypeError, match="structured_outputs must be None or a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": SCHEMA})
    assert not llm.engine.requests


@pytest.fixture(scope="module")
def http(tiny_model_dir, one_thread):
    pytest.importorskip("fastapi")
    with in_process_server(tiny_model_dir) as client:
        yield client


def chat(http, **body):
    return http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 120, "temperature": 0,
                                                    "messages": [{"role": "user", "content": "red green"}], **body})


def test_the_server_takes_response_format_and_vllm_fields(http):
    r = chat(http, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(value) == {"name", "age"}
    r = chat(http, guided_choice=["red wine", "green tea"])
    assert r.json()["choices"][0]["message"]["content"] in ("red wine", "green tea")
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "blue", "max_tokens": 20,
                                           "structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", r.json()["choices"][0]["text"]), r.text


@pytest.mark.parametrize("body,field", [
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": 3}}}),
     "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(guided_regex="(open"), "guided_regex"),
    (dict(guided_regex="a", guided_choice=["b"]), "guided_choice"),
    (dict(structured_outputs={"xml": "x"}), "structured_outputs"),
])
def test_bad_constraints_are_400s_naming_the_field(http, body, field):
    r = chat(http, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert chat(http, max_tokens=2).status_code == 200  # the server serves on


NESTED = {"type": "object", "properties": {
    "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["id"], "additionalProperties": False},
    "colour": {"enum": ["red", "green", "blue"]},
    "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["owner", "colour", "scores", "ok"], "additionalProperties": False}


def validate_nested(value) -> None:
    assert set(value) == {"owner", "colour", "scores", "ok"}
    assert set(value["owner"]) == {"id"} and 1 <= value["owner"]["id"] <= 9
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    assert 1 <= len(value["scores"]) <= 3 and all(0 <= s <= 1 for s in value["scores"])


@pytest.mark.parametrize("stream", [False, True])
def test_nested_enum_array_schema_through_the_server(http, stream):
    body = dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": NESTED}},
                max_tokens=200, temperature=0.8, seed=3, stream=stream)
    r = chat(http, **body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    else:
        text = r.json()["choices"][0]["message"]["content"]
    validate_nested(json.loads(text))
