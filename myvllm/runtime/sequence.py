"""One sequence's state: its tokens, status, KV block table and sampling params.

A request with n > 1 becomes n sequences that share the request id.

Who writes what: the engine makes a sequence (its prompt, params, seed, arrival); the
scheduler writes its status, computed and in-flight token counts, received tokens,
logprobs, finish / stop reasons; the model runner's GrammarWindow (sample/structured.py)
advances its grammar as the tokens are sampled; the block manager its block table and block hashes
(and the computed count it finds in the prefix cache); the stop checker its stop_state
and output_text. Every other module only reads it.

Token accounting:
    token_ids = prompt + generated tokens the host has received
    num_inflight_tokens = tokens sampled by a decode window that is still running (or
    not yet read back); they follow token_ids, and only the device knows their values
    len(seq) = len(token_ids) + num_inflight_tokens: what the scheduler plans with
    num_computed_tokens = leading tokens whose K/V are in the cache (prefix-cache
    hits included). The next step computes tokens num_computed_tokens...
    A sequence samples a token in a step whose chunk reaches the end of its tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from myvllm.outputs import Logprob
from myvllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class StopState:
    """Incremental detokenization state, kept only for sequences that need text early."""

    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        seed: int | None = None,
        arrival: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # position among the request's n samples
        self.params = params
        self.seed = seed
        self.arrival = arrival  # admission order key; preserved across preemption
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_inflight_tokens = 0
        self.num_hashed_blocks = 0  # leading blocks of block_table already offered to the cache
        self.block_hashes: list[bytes] = []  # chain hashes of leading full blocks of token_ids
        self.num_cached_prompt_tokens = 0  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        # entry i for prompt token i (None for the first); filled as the prompt is computed
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0
        self.stop_state: StopState | None = None  # set when text is needed while running
        self.min_tokens_banned: list[int] = []  # ids that cannot be sampled before min_tokens
        self.output_text: str | None = None
        self.grammar = None  # a sample.structured.Grammar when the output is constrained (structured_outputs)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_inflight_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.value}, "
            f"tokens={len(self)}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, those still in flight included."""
        return len(self) - self.num_prompt_tokens

    @property
    def num_received_output_tokens(self) -> int:
        """Generated tokens the host holds."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        """The last token the host holds."""
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
