"""Continuous batching: which sequences run in the next step, and how many tokens each.

Pure CPU Python over Sequences; unit-testable without running a model.

Per step, under a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs):
  1. running sequences, decodes first (1 token each), then unfinished prefills
     (chunked to the remaining budget); a sequence that cannot get a KV block
     preempts the most recently arrived running sequence not yet scheduled
     (its blocks are freed and it is recomputed later), or itself if none is left;
  2. waiting sequences in arrival order, each with its prefix-cache hits, its
     prompt chunked to the remaining budget, while blocks and budget last.
  3. a decode-only batch with nothing waiting may run several passes (up to
     num_scheduler_steps) if every sequence gets the blocks for them.

A decode window's tokens may still be in flight when the next schedule is made
(the engine schedules ahead, see runtime/engine.py): advance_window() counts them
at launch, receive_tokens() fills them in later. A sequence whose tokens in flight
already bring it to max_tokens or max_model_len is not scheduled again; it finishes
when they arrive.
Running sequences are kept in arrival order, so the oldest request is the last to
be preempted and no request waits forever.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: decodes first, then prefill chunks."""

    seqs: list[Sequence]
    num_new_tokens: list[int]  # per seq: 1 for a decode, chunk length for a prefill
    num_computed_tokens: list[int]  # per seq: tokens already in the KV cache
    is_decode_only: bool
    padded_batch_size: int  # == len(seqs) unless padded up to a captured graph's size
    num_steps: int = 1  # decode passes in this step (multi-step decoding)
    step_limits: list[int] | None = None  # per seq: passes whose token it keeps (<= num_steps)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def limits(self) -> list[int]:
        """Per seq: decode passes whose token it keeps (1 each for a single pass)."""
        return self.step_limits if self.step_limits is not None else [1] * len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether seq i's chunk reaches the end of its tokens (so it samples one)."""
        return self.num_computed_tokens[i] + self.num_new_tokens[i] == len(self.seqs[i])


def pick_padded_size(batch_size: int, sizes: list[int]) -> int:
    """Smallest size in the sorted list holding batch_size; batch_size itself above them."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else batch_size


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        graph_batch_sizes: list[int] | None = None,
        max_model_len: int | None = None,
        num_scheduler_steps: int = 1,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.num_scheduler_steps = num_scheduler_steps
        # Decode-only batches are padded up to one of these (sizes of captured graphs).
        self.graph_batch_sizes = sorted(graph_batch_sizes or [])
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def all_seqs(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and release its blocks (it may be running or waiting). Tokens
        still in flight are dropped; the window that computes them writes only to blocks
        freed here, and whatever reuses them runs after it on the device."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.num_inflight_tokens = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it back at the front of the queue (recomputed later).
        Its tokens in flight are dropped: it is recomputed from the tokens the host holds."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_inflight_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        keys = [s.arrival for s in self.running]
        self.running.insert(bisect.bisect_right(keys, seq.arrival), seq)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        new_tokens: list[int] = []
        computed: list[int] = []
        scheduled_ids: set[int] = set()
        preempted = False

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            computed.append(seq.num_computed_tokens)
            bm.append_slots(seq, n)
            scheduled.append(seq)
            new_tokens.append(n)
            scheduled_ids.add(seq.seq_id)
            budget -= n

        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1
                   and not (s.num_inflight_tokens and self.reached_length_limit(s))]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0 or len(scheduled) == self.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append(seq, n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled_ids), None)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                take(seq, n)

        # New admissions only when nothing was preempted: the pool is full otherwise.
        while not preempted and self.waiting and budget > 0 and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq)
            n = min(len(seq) - len(cached) * bm.block_size, budget)
            if not bm.can_admit(seq, cached, n):
                break
            self.waiting.popleft()
            bm.admit(seq, cached)
            self._admit_running(seq)
            take(seq, n)

        if not scheduled:
            return None
        decode_only = all(n == 1 for n in new_tokens) and all(
            c + 1 == len(s) for s, c in zip(scheduled, computed)
        )
        padded = pick_padded_size(len(scheduled), self.graph_batch_sizes) if decode_only else len(scheduled)
        batch = ScheduledBatch(scheduled, new_tokens, computed, decode_only, padded)
        if decode_only and self.num_scheduler_steps > 1 and not self.waiting:
            self._plan_multi_step(batch)
        return batch

    def reached_length_limit(self, seq: Sequence) -> bool:
        """Whether seq's tokens (those in flight included) reach its max_tokens or max_model_len."""
        p = seq.params
        return ((p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or (self.max_model_len is not None and len(seq) >= self.max_model_len))

    def _plan_multi_step(self, batch: ScheduledBatch) -> None:
        """Let a decode-only batch run several passes if every sequence can get the blocks.

        Sequence i keeps the tokens of its first limits[i] passes: no more than its
        max_tokens or max_model_len allow. Sequences still under min_tokens (whose stop
        tokens are banned per token) keep single steps.
        """
        bm = self.block_manager
        k = self.num_scheduler_steps
        limits = []
        for seq in batch.seqs:
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                return
            limit = k
            if p.max_tokens is not None:
                limit = min(limit, p.max_tokens - seq.num_output_tokens)
            if self.max_model_len is not None:
                limit = min(limit, self.max_model_len - len(seq))
            limits.append(max(1, limit))
        if max(limits) == 1:
            return
        # blocks for the extra passes: computed + 1 is already covered
        extra = sum(bm.num_new_blocks(s, n) for s, n in zip(batch.seqs, limits))
        if extra > bm.num_free_blocks:
            return
        for seq, n in zip(batch.seqs, limits):
            bm.append_slots(seq, n)
        batch.num_steps = max(limits)
        batch.step_limits = limits

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance each seq past its computed chunk, append sampled tokens, cache full blocks.

        sampled[i] is the new token of seq i, or None for a chunk that does not end its tokens.
        Returns the sequences that received a token.
        """
        got_token = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.status is not SequenceStatus.RUNNING:  # finished or aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if token is not None:
                seq.append_token(token)
                got_token.append(seq)
        return got_token

    def advance_window(self, batch: ScheduledBatch) -> None:
        """A decode-only batch was launched: each pass of seq i computes the K/V of the token
        before it and samples the next, for its first step_limits[i] passes. Count those
        tokens as computed and in flight until receive_tokens() brings their values."""
        for seq, n in zip(batch.seqs, batch.limits):
            seq.num_computed_tokens += n
            seq.num_inflight_tokens += n

    def receive_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        """The values of a running seq's oldest tokens in flight."""
        assert len(tokens) <= seq.num_inflight_tokens, f"{seq}: {len(tokens)} tokens for {seq.num_inflight_tokens}"
        seq.token_ids.extend(tokens)
        seq.num_inflight_tokens -= len(tokens)
        self.block_manager.cache_full_blocks(seq)

    def check_integrity(self) -> None:
        """Block manager invariants over the sequences that hold blocks."""
        for seq in self.waiting:
            assert not seq.block_table, f"waiting {seq} holds blocks"
        self.block_manager.check_integrity(s.block_table for s in self.running)
