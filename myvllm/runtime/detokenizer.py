"""Incremental detokenization, for sequences whose text is needed while they run
(stop strings, streaming). Others are decoded once, when they finish.

A token can end in the middle of a multi-byte character; text is only emitted
once the decoded tail no longer ends in the replacement character.
"""

from __future__ import annotations

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
