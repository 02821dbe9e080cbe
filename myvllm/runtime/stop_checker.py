"""When a sequence stops, checked after each token it receives.

In vLLM's order: EOS (unless ignore_eos) and stop_token_ids once min_tokens is
reached, then stop strings, then max_tokens and max_model_len ("length").
"""

from __future__ import annotations

from myvllm.runtime.detokenizer import decode_new_text
from myvllm.runtime.sequence import Sequence, StopState


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int, decoder) -> None:
        """decoder: what decodes output tokens to text (detokenizer.fast_decoder), None without a tokenizer."""
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.decoder = decoder

    def check(self, seq: Sequence) -> tuple[str, int | str | None] | None:
        """(finish_reason, stop_reason) if seq must stop after its last token, else None."""
        p = seq.params
        token = seq.last_token_id
        num_out = seq.num_received_output_tokens  # tokens still in flight come after this one
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if p.stop_token_ids and token in p.stop_token_ids:
                return "stop", token
            if p.stop_list and self.decoder is not None:
                hit = self._check_stop_strings(seq)
                if hit is not None:
                    return "stop", hit
        if seq.grammar is not None and seq.grammar.stops(num_out):  # the constrained output is complete
            return "stop", None
        if p.max_tokens is not None and num_out >= p.max_tokens:
            return "length", None
        if len(seq.token_ids) >= self.max_model_len:
            return "length", None
        return None

    def _check_stop_strings(self, seq: Sequence) -> str | None:
        state = seq.stop_state
        if state is None:
            state = seq.stop_state = StopState()
        p = seq.params
        new_text = decode_new_text(self.decoder, seq.output_token_ids, state, p.skip_special_tokens)
        if not new_text:
            return None
        text = state.text
        for stop in p.stop_list:
            # only where the new text could complete a match
            start = max(0, len(text) - len(new_text) - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1:
                seq.output_text = text[:idx + len(stop)] if p.include_stop_str_in_output else text[:idx]
                return stop
        return None
