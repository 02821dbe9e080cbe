"""The hermes tool-call parser (Qwen3's format): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks in a reply become OpenAI `tool_calls`.

Output that does not parse (a block left open, JSON that is not an object with a string
`name`) stays plain content: a model's malformed call is the client's to see, never an
error. `ToolCallStream` streams the text before the first block as content and holds the
rest back until the reply ends, then sends the calls whole (one delta each) or, if they do
not parse, the held text as content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from myvllm.entrypoints.parsers.tags import partial_tag_length

START, END = "<tool_call>", "</tool_call>"
TOOL_CALL_PARSERS = ("hermes",)
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)


def _call(block: str) -> dict[str, Any] | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": value["name"], "arguments": arguments}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole reply: content is the text before the first block
    (None if blank); with no parseable block, the whole text is content and there are no calls."""
    start = text.find(START)
    if start < 0:
        return text or None, []
    rest = text[start:]
    blocks = _BLOCK.findall(rest)
    calls = [_call(b.strip()) for b in blocks]
    leftover = _BLOCK.sub("", rest).strip()
    if not blocks or None in calls or leftover:
        return text or None, []
    return text[:start].strip() or None, calls


class ToolCallStream:
    """Splits the growing content of one streamed choice into content deltas, then tool calls."""

    def __init__(self) -> None:
        self.sent = 0  # characters of content sent

    def advance(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool calls) new since the last call; calls come only when finished."""
        start = text.find(START)
        if not finished:
            end = start if start >= 0 else len(text) - partial_tag_length(text, START)
            delta, self.sent = text[self.sent:end], max(self.sent, end)
            return delta, []
        content, calls = parse_tool_calls(text)
        if not calls:
            delta, self.sent = text[self.sent:], len(text)
            return delta, []
        delta = (content or "")[self.sent:] if len(content or "") > self.sent else ""
        self.sent = len(text)
        return delta, calls
