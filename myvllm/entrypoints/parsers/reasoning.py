"""The Qwen3 reasoning parser: text inside <think>...</think> is `reasoning_content`.

Qwen3 models think first and answer after `</think>`. The chat template may open `<think>`
in the prompt (then the output holds only the closing tag), or the model writes both tags.
Until `</think>` appears, everything so far is reasoning; with thinking turned off in the
chat template (`enable_thinking: false`), the output is all content. Streaming goes through
`ReasoningStream`, which holds back a tag that may still be completing, so a delta never
splits `<think>` or `</think>`.
"""

from __future__ import annotations

from myvllm.entrypoints.parsers.tags import partial_tag_length

START, END = "<think>", "</think>"
REASONING_PARSERS = ("qwen3",)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; None where a part is empty."""
    if not thinking:
        return None, text or None
    body = text[len(START):] if text.startswith(START) else text
    reasoning, sep, content = body.partition(END)
    if not sep:  # no answer yet: all reasoning
        return reasoning or None, None
    return reasoning or None, content or None


class ReasoningStream:
    """Turns the growing text of one streamed choice into (reasoning delta, content delta)."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.reasoning_sent = 0
        self.content_sent = 0

    def advance(self, text: str, finished: bool) -> tuple[str, str]:
        """The reasoning and content text new since the last call; text: the output so far."""
        if not finished and self.thinking:
            hold = max(partial_tag_length(text, END), partial_tag_length(text, START) if len(text) < len(START)
                       else 0)
            text = text[:len(text) - hold]
        reasoning, content = split_reasoning(text, self.thinking)
        reasoning, content = reasoning or "", content or ""
        new_reasoning = reasoning[self.reasoning_sent:]
        new_content = content[self.content_sent:]
        self.reasoning_sent, self.content_sent = len(reasoning), len(content)
        return new_reasoning, new_content
