"""The Qwen3 reasoning parser: whole outputs, streamed outputs split at every point, and the chat
server's reasoning_content (non-streaming and streaming)."""

from __future__ import annotations

import json

import pytest
from engine_utils import in_process_server

from myvllm.entrypoints.parsers.reasoning import ReasoningStream, split_reasoning

CASES = [
    ("<think>weigh it</think>\n\nThe answer.", True, ("weigh it", "\n\nThe answer.")),
    ("weigh it</think>The answer.", True, ("weigh it", "The answer.")),  # the template opened <think>
    ("still thinking", True, ("still thinking", None)),  # no </think> yet: all reasoning
    ("<think></think>Just this.", True, (None, "Just this.")),
    ("No tags here.", False, (None, "No tags here.")),  # enable_thinking false
    ("", True, (None, None)),
]


@pytest.mark.parametrize("text,thinking,expected", CASES)
def test_split_reasoning(text, thinking, expected):
    assert split_reasoning(text, thinking) == expected


@pytest.mark.parametrize("text,thinking,expected", CASES)
def test_streamed_deltas_add_up_and_never_split_a_tag(text, thinking, expected):
    for step in (1, 2, 3, 5):
        stream = ReasoningStream(thinking)
        reasoning, content = "", ""
        for end in list(range(0, len(text), step)) + [len(text)]:
            r, c = stream.advance(text[:end], finished=end == len(text))
            assert not any(part in r + c for part in ("</th", "<thi", "think>")), (step, end, r, c)
            reasoning, content = reasoning + r, content + c
        assert (reasoning or None, content or None) == expected, step


@pytest.fixture(scope="module")
def servers(tiny_model_dir, one_thread):
    pytest.importorskip("fastapi")
    with in_process_server(tiny_model_dir, 128) as plain, \
            in_process_server(tiny_model_dir, 128, reasoning_parser="qwen3") as thinking, \
            in_process_server(tiny_model_dir, 128, reasoning_parser="qwen3",
                              default_chat_template_kwargs={"enable_thinking": False}) as no_thinking:
        yield plain, thinking, no_thinking


def chat(http, stream=False, **body):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "red green blue"}], "max_tokens": 10,
               "temperature": 0, "ignore_eos": True, "stream": stream, **body}
    r = http.post("/v1/chat/completions", json=request)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]
    deltas = [json.loads(line[6:])["choices"] for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return [c[0]["delta"] for c in deltas if c]


def test_the_chat_server_returns_reasoning_content(servers):
    plain, thinking, no_thinking = servers
    text = chat(plain)["content"]
    assert "</think>" not in text  # the tiny model never closes its thought: all of it is reasoning
    assert chat(thinking) == {"role": "assistant", "content": None, "reasoning_content": text}
    off = chat(plain, chat_template_kwargs={"enable_thinking": False})["content"]
    assert chat(no_thinking) == {"role": "assistant", "content": off, "reasoning_content": None}
    assert chat(thinking, chat_template_kwargs={"enable_thinking": False})["content"] == off


def test_the_chat_server_streams_reasoning_content(servers):
    plain, thinking, _ = servers
    text = "".join(d.get("content", "") for d in chat(plain, stream=True))
    deltas = chat(thinking, stream=True)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == text
    assert not any(d.get("content") for d in deltas[1:]), "no content before </think>"
