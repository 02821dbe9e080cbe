"""SamplingParams: vLLM's names and defaults, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature sampling is treated as greedy (avoids dividing by ~0).
GREEDY_EPS = 1e-5
# Integers that reach the sampler as int64 (seeds, top_k) must fit it.
MAX_INT64 = (1 << 63) - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How to sample one request.

    top_k: -1 or 0 disables, else >= 1. top_p in (0, 1]. min_p in [0, 1].
    temperature 0 means greedy. `stop` strings are matched on the detokenized output
    and excluded from the returned text; `stop_token_ids` and the model's EOS (unless
    `ignore_eos`) end generation too. `logprobs=k` returns the top-k log-probabilities
    (of the raw model distribution) per generated token, plus the sampled token's.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r} is out of range: must be an int >= 1")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r} is out of range: must be a finite number >= 0")
        p = self.top_p
        if not _is_number(p) or not (0 < p <= 1):
            raise ValueError(f"top_p={p!r} is out of range: must be in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_INT64:
            raise ValueError(f"top_k={self.top_k!r} is out of range: -1 or 0 disables, else in [1, 2**63 - 1]")
        m = self.min_p
        if not _is_number(m) or not (0 <= m <= 1):
            raise ValueError(f"min_p={m!r} is out of range: must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_INT64):
            raise ValueError(f"seed={self.seed!r} is out of range: must be None or an int in [0, 2**63 - 1]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens={self.max_tokens!r} is out of range: must be None or an int >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} is out of range: must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is out of range: must be <= max_tokens={self.max_tokens}"
            )
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            raise TypeError(f"stop={self.stop!r} must be a str or a list of str")
        if any(s == "" for s in self.stop_list):
            raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
                raise TypeError(f"stop_token_ids={ids!r} must be a list of ints >= 0")
            self.stop_token_ids = list(ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs={self.logprobs!r} is out of range: must be None or an int >= 0")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
