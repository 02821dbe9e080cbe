"""Structured outputs through xgrammar: a grammar matcher per constrained sequence, and the
token bitmask of a batch's constrained rows.

Grammars are compiled once per (kind, spec) and cached. JSON is generated compact (one space
after "," and ":"), so a model cannot spend its tokens on whitespace. A constrained sequence runs one
forward pass per batch and is not scheduled ahead of the batch in flight: its next bitmask
needs its last token accepted on the host (runtime/scheduler.py). The bitmask is filled on
the host for the constrained rows (the others allow every token) and applied to the logits
on the device by the sampler.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from myvllm.sampling_params import StructuredOutputsParams


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured outputs need the xgrammar package: pip install xgrammar") from e
    return xgrammar


class StructuredOutputs:
    """Compiles and caches grammars for one tokenizer and vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler = None
        self._cache: dict[tuple[str, str], Any] = {}

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher of spec's grammar (compiled on first use); ValueError naming the field
        when the grammar does not compile."""
        xgr = _xgrammar()
        if self.tokenizer is None:
            raise ValueError(f"{spec.field_name} needs a tokenizer, but skip_tokenizer_init=True")
        key = _key(spec)
        compiled = self._cache.get(key)
        if compiled is None:
            try:
                compiled = self._compile(spec)
            except Exception as e:  # xgrammar's parse errors: the spec is the client's
                raise ValueError(f"{spec.field_name}: the {key[0]} does not compile: {e}") from None
            self._cache[key] = compiled
        return xgr.GrammarMatcher(compiled)

    def _compile(self, spec: StructuredOutputsParams):
        xgr = _xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info)
        c = self._compiler
        if spec.json_object or spec.json is not None:
            schema = {"type": "object"} if spec.json_object else spec.json
            # compact JSON (", " and ": " between items): no run of whitespace to wander into
            return c.compile_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                         any_whitespace=False)
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
        return c.compile_grammar(spec.grammar)


def _key(spec: StructuredOutputsParams) -> tuple[str, str]:
    if spec.json_object:
        return "json object", ""
    if spec.json is not None:
        return "JSON schema", spec.json if isinstance(spec.json, str) else json.dumps(spec.json, sort_keys=True)
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(spec.choice)
    return "grammar", spec.grammar


def token_bitmask(matchers: list, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, ceil(V / 32)] int32 on the device: row i allows the tokens matchers[i] accepts next
    (every token where matchers[i] is None)."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_next_token_bitmask(bitmask, i)
    return bitmask.to(device)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf on the tokens each row's bitmask forbids (in place; float logits)."""
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask)
