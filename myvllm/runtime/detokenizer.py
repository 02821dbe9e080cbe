"""Incremental detokenization, for sequences whose text is needed while they run
(stop strings, streaming). Others are decoded once, when they finish.

A token can end in the middle of a multi-byte character; text is only emitted
once the decoded tail no longer ends in the replacement character.

`fast_decoder` decodes through a fast tokenizer's Rust backend, skipping transformers' per-call
conversion of the ids (most of the time of a short decode), where that gives the same text.
"""

from __future__ import annotations

from typing import Any

from myvllm.runtime.sequence import StopState

REPLACEMENT_CHAR = "\ufffd"


def decode_new_text(tokenizer, output_ids: list[int], state: StopState, skip_special_tokens: bool) -> str:
    """Append the text of newly read output tokens to state.text and return that new text."""
    before = tokenizer.decode(output_ids[state.prefix_offset:state.read_offset],
                              skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(output_ids[state.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) <= len(before) or full.endswith(REPLACEMENT_CHAR):
        return ""
    new_text = full[len(before):]
    state.prefix_offset = state.read_offset
    state.read_offset = len(output_ids)
    state.text += new_text
    return new_text


class _BackendDecoder:
    """tokenizer.decode through a fast tokenizer's Rust backend; the same text when the
    tokenizer does no clean-up of spaces."""

    __slots__ = ("backend",)

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def fast_decoder(tokenizer: Any) -> Any:
    """What decodes output text: the fast backend where it gives tokenizer.decode's text, else
    the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return _BackendDecoder(backend)
    return tokenizer
