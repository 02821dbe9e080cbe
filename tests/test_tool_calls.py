"""The hermes tool-call parser (whole and streamed replies), the chat message built from a reply,
tools through the chat server, and forced calls (tool_choice "required" or a named function)."""

from __future__ import annotations

import json

import pytest
from engine_utils import in_process_server

from myvllm import SamplingParams
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


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["oslo", "rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def check_weather(args: dict) -> None:
    assert set(args) == {"city", "days"} and args["city"] in ("oslo", "rome") and 1 <= args["days"] <= 7, args


@pytest.mark.parametrize("with_parser", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called_with_valid_arguments(servers, stream, with_parser):
    http = servers[1] if with_parser else servers[0]  # a forced call needs no tool-call parser
    r = post(http, tools=[TIME_TOOL, WEATHER_TOOL], max_tokens=60, ignore_eos=False, stream=stream,
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
        assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = r.json()["choices"][0]
        calls, finish = choice["message"]["tool_calls"], choice["finish_reason"]
        assert choice["message"]["content"] is None
    assert finish == "tool_calls" and [c["function"]["name"] for c in calls] == ["get_weather"]
    check_weather(json.loads(calls[0]["function"]["arguments"]))


def test_required_calls_one_of_the_tools(servers):
    _, tools = servers
    for seed in range(4):
        # one call (the random model would go on adding calls to the array)
        r = post(tools, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", max_tokens=120, ignore_eos=False,
                 temperature=1.0, seed=seed, parallel_tool_calls=False)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1, r.text
        for call in choice["message"]["tool_calls"]:
            args = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "get_weather":
                check_weather(args)
            else:
                assert call["function"]["name"] == "get_time" and args["zone"] in ("UTC", "CET"), call


def test_a_call_cut_by_max_tokens_stays_content(servers):
    _, tools = servers
    r = post(tools, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=3)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"], r.text
    assert choice["message"]["content"].startswith("[{")


def test_a_forced_call_after_reasoning(tiny_model_dir, one_thread):
    pytest.importorskip("fastapi")
    from myvllm.entrypoints.parsers.reasoning import END
    from myvllm.entrypoints.tool_choice import ForcedToolChoice

    # thinking off: the call is the whole content, no reasoning
    with in_process_server(tiny_model_dir, reasoning_parser="qwen3") as http:
        r = post(http, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 max_tokens=60, ignore_eos=False, chat_template_kwargs={"enable_thinking": False})
    message = r.json()["choices"][0]["message"]
    assert message.get("reasoning_content") is None and message["content"] is None, r.text
    check_weather(json.loads(message["tool_calls"][0]["function"]["arguments"]))
    # thinking on: the constraint starts after </think>
    forced = ForcedToolChoice("get_weather", {"get_weather": WEATHER_TOOL["function"]["parameters"]})
    assert forced.constrain(SamplingParams(), True).structured_outputs.starts_after == END
    assert forced.constrain(SamplingParams(), False).structured_outputs.starts_after is None


@pytest.mark.parametrize("body", [
    dict(tool_choice="required"),  # no tools
    dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
    dict(tools=TOOLS, tool_choice="sometimes"),
    dict(tools=TOOLS, tool_choice="required", guided_choice=["a", "b"]),
    dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}],
         tool_choice="required"),
])
def test_bad_forced_tool_choices_are_400s(servers, body):
    _, tools = servers
    r = post(tools, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


def test_a_tool_turn_is_served(servers):
    plain, tools = servers
    expected = post(plain).json()["choices"][0]["message"]["content"]
    r = post(tools, tools=TOOLS, tool_choice="auto")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"
