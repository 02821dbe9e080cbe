"""SamplingParams: vLLM's names and defaults, validated at construction.

A value of the wrong type raises TypeError, one of the right type outside its range
ValueError; both messages start with the field's name. A keyword that is not a field
raises TypeError too, saying whether it is a vLLM field not supported here yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

# Below this temperature sampling is treated as greedy (avoids dividing by ~0).
GREEDY_EPS = 1e-5
# Integers that reach the sampler as int64 (seeds, top_k) must fit it.
MAX_INT64 = (1 << 63) - 1
# vLLM SamplingParams arguments this engine does not implement yet; a field added to
# SamplingParams is accepted whether or not its name is listed here.
UNSUPPORTED_VLLM_FIELDS = frozenset({
    "best_of", "bad_words",
    "detokenize", "spaces_between_special_tokens", "logits_processors", "truncate_prompt_tokens", "output_kind",
    "guided_decoding", "logit_bias", "allowed_token_ids", "extra_args", "use_beam_search",
    "length_penalty", "early_stopping",
})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_error(name: str, value, expected: str) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _check_int(name: str, value, low: int, high: int | None = None, *, optional: bool = False,
               allowed: str | None = None) -> None:
    """value is an int in [low, high] (or None when optional); allowed overrides the range's wording."""
    if optional and value is None:
        return
    if not _is_int(value):
        raise _type_error(name, value, "None or an int" if optional else "an int")
    if value < low or (high is not None and value > high):
        if allowed is None:
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} is out of range: must be {allowed}")


def _check_number(name: str, value, in_range: Callable[[float], bool], allowed: str) -> None:
    """value is an int or float for which in_range holds (allowed describes that range)."""
    if not _is_number(value):
        raise _type_error(name, value, "a number")
    if not in_range(value):
        raise ValueError(f"{name}={value!r} is out of range: must be {allowed}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise _type_error(name, value, "a bool")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names), exactly one of: json (a JSON schema, as a dict
    or a JSON string), json_object (any JSON object), regex, choice (one of these strings),
    grammar (an EBNF grammar, xgrammar's dialect). field_name: the request field that set it,
    named in errors (the server's response_format, say). starts_after: text (a reasoning
    model's "</think>") before whose first appearance the output is free; the constraint
    holds from the token after it (matched as the tokenizer encodes the text alone)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    field_name: str = "structured_outputs"
    starts_after: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(f"{self.field_name} must set exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise _type_error(f"{self.field_name}.json", self.json, "a dict or a JSON string")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _type_error(f"{self.field_name}.{name}", value, "a non-empty str")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise _type_error(f"{self.field_name}.choice", self.choice, "a non-empty list of non-empty str")
        if self.starts_after is not None and (not isinstance(self.starts_after, str) or not self.starts_after):
            raise _type_error(f"{self.field_name}.starts_after", self.starts_after, "None or a non-empty str")


def _reject_unknown_keywords(cls):
    """Wraps the dataclass's generated __init__ so that a keyword that is not an init field gets a
    message naming it (and the accepted fields) instead of Python's bare 'unexpected keyword'."""
    generated_init = cls.__init__
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(generated_init)
    def __init__(self, *args, **kwargs):
        for name in kwargs:
            if name in accepted:
                continue
            if name in UNSUPPORTED_VLLM_FIELDS:
                raise TypeError(f"{name} is a vLLM SamplingParams field this engine does not support yet; "
                                f"supported fields: {', '.join(accepted)}")
            raise TypeError(f"{name} is not a SamplingParams field; accepted fields: {', '.join(accepted)}")
        generated_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_reject_unknown_keywords
@dataclass
class SamplingParams:
    """How to sample one request.

    top_k: -1 or 0 disables, else >= 1. top_p in (0, 1]. min_p in [0, 1].
    temperature 0 means greedy. Penalties (vLLM's and OpenAI's definitions), applied to the
    logits before everything else: repetition_penalty > 0 divides the positive logits (and
    multiplies the negative ones) of tokens seen in the prompt or the output, 1 disables;
    frequency_penalty in [-2, 2] subtracts itself times a token's count in the output,
    presence_penalty in [-2, 2] itself once for every token the output holds. `stop` strings
    are matched on the detokenized output and excluded from the returned text;
    `stop_token_ids` and the model's EOS (unless `ignore_eos`) end generation too.
    `logprobs=k` returns the top-k log-probabilities (of the raw model distribution) per
    generated token, plus the sampled token's. `structured_outputs` constrains the output to a
    JSON schema, a regex, a choice or a grammar (xgrammar). `prompt_logprobs=k` the same for every prompt
    token after the first (such a prompt is always computed: it takes no prefix-cache hits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_lengths()
        self._check_stops()
        _check_int("logprobs", self.logprobs, 0, optional=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, optional=True)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _type_error("structured_outputs", self.structured_outputs, "None or a StructuredOutputsParams")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _check_bool(name, getattr(self, name))

    def _check_sampling(self) -> None:
        _check_int("n", self.n, 1)
        _check_number("temperature", self.temperature, lambda t: math.isfinite(t) and t >= 0,
                      "a finite number >= 0")
        _check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, -1, MAX_INT64, allowed="-1 or 0 (disabled), else in [1, 2**63 - 1]")
        _check_number("min_p", self.min_p, lambda m: 0 <= m <= 1, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check_number("repetition_penalty", self.repetition_penalty, lambda r: math.isfinite(r) and r > 0,
                      "a finite number > 0")
        _check_int("seed", self.seed, 0, MAX_INT64, optional=True, allowed="None or an int in [0, 2**63 - 1]")

    def _check_lengths(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, optional=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is out of range: must be <= max_tokens={self.max_tokens}"
            )

    def _check_stops(self) -> None:
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            raise _type_error("stop", self.stop, "None, a str or a list of str")
        if any(s == "" for s in self.stop_list):
            raise ValueError("stop strings must not be empty")
        ids = self.stop_token_ids
        if ids is None:
            return
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
            raise _type_error("stop_token_ids", ids, "None or a list of ints")
        if any(i < 0 for i in ids):
            raise ValueError(f"stop_token_ids={ids!r} is out of range: token ids must be >= 0")
        self.stop_token_ids = list(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
