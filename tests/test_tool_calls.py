"""The hermes tool-call parser (whole and streamed replies), the chat message built from a reply,
and tools through the chat server."""

from __future__ import annotations

import json

import pytest
from engine_utils import in_process_server

from myvllm.entrypoints.parsers.tool_calls import ToolCallStream, parse_tool_calls

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>'


def names_and_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_calls_are_parsed_with_their_arguments_as_json_strings():
    content, calls = parse_tool_calls("Let me look.\n" + WEATHER + "\n" + TIME)
    assert content == "Let me look."
    assert names_and_args(calls) == [("get_weather", {"city": "Oslo", "unit": "c"}), ("get_time", {"zone": "UTC"})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls(WEATHER)[0] is None


@pytest.mark.parametrize("text", [
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": ",  # left open
    "<tool_call>{not json}</tool_call>",
    "<tool_call>{\"arguments\": {}}</tool_call>",  # no name
    "<tool_call>[1, 2]</tool_call>",
    WEATHER + " and then some words",  # text after the calls
    "plain words only",
])
def test_malformed_output_stays_plain_content(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", ["Let me look.\n" + WEATHER + "\n" + TIME, WEATHER, "no calls at all",
                                  "<tool_call>{broken</tool_call>"])
def test_streamed_content_then_calls_add_up_to_the_whole(text):
    expected_content, expected_calls = parse_tool_calls(text)
    for step in (1, 4, 7):
        stream = ToolCallStream()
        content, calls = "", []
        for end in list(range(0, len(text), step)) + [len(text)]:
            delta, new_calls = stream.advance(text[:end], finished=end == len(text))
            assert "<tool" not in delta or not expected_calls, (step, end, delta)
            content, calls = content + delta, calls + new_calls
        assert names_and_args(calls) == names_and_args(expected_calls)
        assert content.strip() == (expected_content or "").strip()


def test_reply_message_splits_reasoning_then_tool_calls():
    pytest.importorskip("fastapi")
    from myvllm.entrypoints.api_server import reply_message

    text = "<think>Oslo needs a lookup.</think>\n\n" + WEATHER
    message, finish = reply_message(text, "stop", thinking=True, tools=True)
    assert message["reasoning_content"] == "Oslo needs a lookup." and message["content"] is None
    assert names_and_args(message["tool_calls"]) == [("get_weather", {"city": "Oslo", "unit": "c"})]
    assert finish == "tool_calls"
    message, finish = reply_message(text, "stop", thinking=None, tools=False)
    assert message == {"role": "assistant", "content": text} and finish == "stop"


@pytest.fixture(scope="module")
def servers(tiny_model_dir, one_thread):
    pytest.importorskip("fastapi")
    with in_process_server(tiny_model_dir) as plain, \
            in_process_server(tiny_model_dir, tool_call_parser="hermes") as tools:
        yield plain, tools


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TURNS = [{"role": "user", "content": "weather in oslo"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "call-1", "content": "red green blue"}]


def post(http, **body):
    return http.post("/v1/chat/completions", json={"model": "tiny", "messages": TURNS, "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True, **body})


def test_tools_need_a_tool_call_parser(servers):
    plain, _ = servers
    r = post(plain, tools=TOOLS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert post(plain, tools=TOOLS, tool_choice="none").status_code == 200


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choices_are_refused_for_now(servers, choice):
    _, tools = servers
    r = post(tools, tools=TOOLS, tool_choice=choice)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


def test_a_tool_turn_is_served(servers):
    plain, tools = servers
    expected = post(plain).json()["choices"][0]["message"]["content"]
    r = post(tools, tools=TOOLS, tool_choice="auto")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"
