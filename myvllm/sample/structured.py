"""Structured outputs through xgrammar: a grammar matcher per constrained sequence, and the
token bitmask of a batch's constrained rows, pass by pass.

Grammars are compiled once per (kind, spec) and cached. JSON is generated compact (one space
after "," and ":"), so a model cannot spend its tokens on whitespace.

A constrained sequence runs in multi-pass decode windows and may be scheduled ahead like any
other (runtime/scheduler.py). Its bitmask for pass k+1 needs the token it sampled in pass k:
within a window the model runner launches pass k+1's forward, then `GrammarWindow.fill`
waits for the constrained rows' tokens of pass k only (a small copy to pinned memory), lets
their matchers take them, fills their bitmask rows on the host and copies them to the device,
and only then is pass k+1 sampled (stream-ordered after that copy). The device idles only
when the host's grammar work takes longer than a forward pass. The first pass of a batch
scheduled ahead takes the last tokens of the batch in flight the same way. Unconstrained
rows allow every token; the sampler applies the bitmask to the logits on the device.

`Grammar` counts the output tokens its matcher has taken, so every token is taken once
whoever brings it first (the window, or the read-back of the batch), and it remembers after
which token the grammar terminated: the stop checker ends the sequence there, as a
single-pass run would, whatever later passes of the window sampled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from myvllm.runtime.host_copy import HostCopy, host_to_device
from myvllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# How often a window that waits for its tokens checks the tensor-parallel workers (when it has some).
WATCH_INTERVAL_S = 0.002


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

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh Grammar (matcher plus token count) of spec, for one sequence."""
        matcher = self.matcher(spec)
        after = None
        if spec.starts_after is not None:
            after = self.tokenizer.encode(spec.starts_after, add_special_tokens=False)
        return Grammar(matcher, after)

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


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf on the tokens each row's bitmask forbids (in place; float logits)."""
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask)


class Grammar:
    """One constrained sequence's matcher, the number of its output tokens it has taken, and
    after how many tokens it terminated (None while it has not). With starts_after (token
    ids), the output is free until those tokens have come, in a row; the matcher takes the
    tokens after them."""

    def __init__(self, matcher, starts_after: list[int] | None = None) -> None:
        self.matcher = matcher
        self.num_accepted = 0
        self.terminated_at: int | None = None
        self.waiting_for = starts_after or None  # the tokens that start the constraint; None once they came
        self._tail: list[int] = []  # the last output tokens, while waiting

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (the grammar is active and not terminated)."""
        return self.waiting_for is None and self.terminated_at is None

    def accept(self, index: int, token: int) -> None:
        """Take the sequence's output token number `index` (0-based). A token taken already, or
        one after the grammar terminated, is ignored; tokens arrive in order."""
        if index < self.num_accepted or self.terminated_at is not None:
            return
        assert index == self.num_accepted, f"grammar at token {self.num_accepted} was given token {index}"
        self.num_accepted += 1
        if self.waiting_for is not None:
            self._tail = (self._tail + [token])[-len(self.waiting_for):]
            if self._tail == self.waiting_for:
                self.waiting_for = None
            return
        if not self.matcher.accept_token(token):
            # cannot happen for a token sampled under this matcher's bitmask; end the output there
            logger.error("the grammar refused token %d at output position %d; the sequence stops", token, index)
            self.terminated_at = self.num_accepted
        elif self.matcher.is_terminated():
            self.terminated_at = self.num_accepted

    def stops(self, num_tokens: int) -> bool:
        """Whether the output is complete after its first num_tokens tokens."""
        return self.terminated_at is not None and num_tokens >= self.terminated_at


class BitmaskFiller:
    """Fills the bitmask rows of several matchers at once, on xgrammar's threads."""

    def __init__(self) -> None:
        self._batch = None

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, rows[0])
            return
        if self._batch is None:
            self._batch = _xgrammar().BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)


class GrammarWindow:
    """The constrained rows of one launched batch (its sampled rows that have a grammar).

    Per pass k, before the pass samples: fill(k) lets the matchers take the tokens not yet
    taken (pass k-1's, or for k = 0 the last pass of the batch in flight before), fills the
    rows' bitmask for pass k on the host and copies them into `bitmask` on the device. After
    it samples: sampled(k, tokens) starts copying the constrained rows' tokens to the host.
    Row i takes the tokens of its first passes_kept[i] passes only. A grammar still waiting for
    its start allows every token; so do a terminated grammar and a pass past those (the
    sequence drops their tokens).
    """

    def __init__(self, grammars: list[Grammar | None], first_index: list[int], passes_kept: list[int],
                 vocab_size: int, device: torch.device, filler: BitmaskFiller,
                 before: GrammarWindow | None = None, watch: Callable[[], None] | None = None) -> None:
        """grammars: per sampled row, None if unconstrained; first_index: per row, the output
        index of the token its first pass samples (tokens in flight included); before: the
        window of the batch in flight, whose last tokens the first pass needs; watch: called
        now and then while waiting for tokens (it raises if a tensor-parallel worker died,
        whose collectives the device would otherwise wait for forever)."""
        self.rows = [i for i, g in enumerate(grammars) if g is not None]
        self.grammars = [grammars[i] for i in self.rows]
        self.first_index = [first_index[i] for i in self.rows]
        self.kept = [passes_kept[i] for i in self.rows]
        self.device = device
        self.filler = filler
        self.before = before
        self.watch = watch
        self.rows_d = host_to_device(np.asarray(self.rows, dtype=np.int64), device)
        xgr = _xgrammar()
        self.host = xgr.allocate_token_bitmask(len(self.rows), vocab_size)  # [C, W] int32
        # [N, W]: every token allowed on the unconstrained rows
        self.bitmask = torch.full((len(grammars), self.host.shape[1]), -1, dtype=torch.int32, device=device)
        self._pending: tuple[int, HostCopy] | None = None  # (pass, its constrained tokens on their way)

    def fill(self, k: int) -> None:
        """Before pass k samples: the matchers take what has arrived, then their bitmask rows."""
        if k == 0 and self.before is not None:
            self.before.finish()
            self.before = None  # windows do not chain
        self.finish()
        live, rows = [], []
        for j, (g, kept, first) in enumerate(zip(self.grammars, self.kept, self.first_index)):
            if k >= kept or not g.constrains:
                self.host[j].fill_(-1)
                continue
            assert g.num_accepted == first + k, f"grammar at token {g.num_accepted}, pass {k} samples {first + k}"
            live.append(g.matcher)
            rows.append(j)
        if live:
            self.filler.fill(live, self.host, rows)
        staged = self.host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else self.host
        if len(self.rows) == self.bitmask.shape[0]:
            self.bitmask.copy_(staged)
        else:
            self.bitmask.index_copy_(0, self.rows_d, staged)

    def sampled(self, k: int, tokens: torch.Tensor) -> None:
        """After pass k: start copying the constrained rows' sampled tokens (of tokens [N]) to the host."""
        self._pending = (k, HostCopy(tokens.index_select(0, self.rows_d)))

    def finish(self) -> None:
        """Let the matchers take the tokens of the last pass copied (waits for them); idempotent."""
        if self._pending is None:
            return
        k, copy = self._pending
        self._pending = None
        if self.watch is not None:
            next_check = time.monotonic()
            while not copy.done():
                if time.monotonic() >= next_check:
                    self.watch()
                    next_check = time.monotonic() + WATCH_INTERVAL_S
                time.sleep(0)
        for g, kept, first, token in zip(self.grammars, self.kept, self.first_index, copy.result().tolist()):
            if k < kept:
                g.accept(first + k, token)
