"""Structured outputs and forced tool calls through a real server process and the `openai` client:
whatever a tiny random-weight model prefers, the constraint makes the output valid. Schemas
come from pydantic models, and pydantic (not the grammar) validates the outputs."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import pytest
from server_process import server_process

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
pytest.importorskip("fastapi")
pydantic = pytest.importorskip("pydantic")
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Owner(Strict):
    id: Annotated[int, Field(ge=1, le=9)]
    kind: Literal["person", "shop"]


class Order(Strict):  # nested objects, an enum, an array of numbers, a boolean
    owner: Owner
    colour: Literal["red", "green", "blue"]
    scores: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1, max_length=3)]
    paid: bool


class Point(Strict):  # numbers: integers with bounds, and an array of objects
    x: Annotated[int, Field(ge=-50, le=50)]
    y: Annotated[int, Field(ge=0, le=9)]


class Path(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z]{1,6}$")]
    points: Annotated[list[Point], Field(min_length=1, max_length=2)]


class Weather(Strict):
    city: Literal["oslo", "rome"]
    days: Annotated[int, Field(ge=1, le=7)]


class Time(Strict):
    zone: Literal["UTC", "CET"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": Weather.model_json_schema()}},
         {"type": "function", "function": {"name": "get_time", "parameters": Time.model_json_schema()}}]
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with server_process(tiny_model_dir, "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def chat(client, stream: bool, **kw) -> tuple[str, list, str]:
    """(content, tool calls as (name, arguments), finish_reason), streamed or not."""
    kw = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "temperature": 0.8, "seed": 1, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += [(c.function.name, c.function.arguments) for c in delta.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [Order, Path, Weather])
def test_json_schema_outputs_validate(client, model, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema(),
                                                  "strict": True}}
    for seed in (1, 2):
        content, calls, finish = chat(client, stream, response_format=fmt, seed=seed)
        assert finish == "stop" and not calls, content
        model.model_validate_json(content)


def test_json_object(client):
    content, _, finish = chat(client, False, response_format={"type": "json_object"}, max_tokens=40, seed=4)
    assert content.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(content, strict=False), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_choice_and_regex(client, stream):
    choices = ["red wine", "blue cheese", "green tea"]
    for seed in range(3):
        content, _, _ = chat(client, stream, extra_body={"guided_choice": choices}, seed=seed)
        assert content in choices
        content, _, _ = chat(client, stream, extra_body={"guided_regex": r"[A-F]{2}-[0-9]{3}"}, seed=seed)
        assert re.fullmatch(r"[A-F]{2}-[0-9]{3}", content), content
    r = client.completions.create(model="tiny", prompt="blue", max_tokens=20, extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name,model", [("get_weather", Weather), ("get_time", Time)])
def test_a_named_tool_is_called_with_valid_arguments(client, name, model, stream):
    content, calls, finish = chat(client, stream, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": name}})
    assert finish == "tool_calls" and not content and [n for n, _ in calls] == [name]
    model.model_validate_json(calls[0][1])


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_a_tool_with_valid_arguments(client, stream):
    for seed in range(3):
        content, calls, finish = chat(client, stream, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                      seed=seed)
        assert finish == "tool_calls" and not content and len(calls) == 1, (content, calls)
        name, arguments = calls[0]
        {"get_weather": Weather, "get_time": Time}[name].model_validate_json(arguments)


def test_an_unknown_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, False, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_date"}})
    assert e.value.body["param"] == "tool_choice"
