"""Continuous batching: which sequences run in the next step, and what their tokens are.

Pure CPU Python over Sequences; unit-testable without running a model. One step reads:

    batch = scheduler.schedule()              which sequences, how many tokens each
    (the model runner launches the batch)
    scheduler.launched(batch)                 its tokens count as computed / in flight
    scheduler.update_from_output(batch, out)  sampled tokens arrive; stop checks; finished

Per batch, under a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs):
  1. running sequences, decodes first (1 token each), then unfinished prefills
     (chunked to the remaining budget); a sequence that cannot get a KV block
     preempts the most recently arrived running sequence not yet scheduled
     (its blocks are freed and it is recomputed later), or itself if none is left;
  2. waiting sequences in arrival order, each with its prefix-cache hits, its
     prompt chunked to the remaining budget, while blocks and budget last;
  3. a decode-only batch with nothing waiting runs several forward passes (up to
     num_decode_passes; pass k+1 reads the tokens pass k sampled, on the device) if
     every sequence gets the blocks for them.

Tokens in flight: from launch until their values arrive, a batch's sampled tokens are
counted in `Sequence.num_inflight_tokens`. With async_scheduling, the next decode-only
batch is scheduled while the one before it is still in flight, when nothing in it depends
on that batch's values (only decodes of running sequences, whose input tokens are on the
device, and no preemption, which would drop tokens in flight). A sequence whose tokens in
flight already bring it to max_tokens or max_model_len is not scheduled again; it finishes
when they arrive.
Running sequences are kept in arrival order, so the oldest request is the last to
be preempted and no request waits forever.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.sequence import Sequence, SequenceStatus
from myvllm.runtime.stop_checker import StopChecker
from myvllm.sample.output import PassOutput


@dataclass
class ScheduledBatch:
    """One step's work: decodes first, then prefill chunks."""

    seqs: list[Sequence]
    num_new_tokens: list[int]  # per seq: 1 for a decode, chunk length for a prefill
    num_computed_tokens: list[int]  # per seq: tokens already in the KV cache
    num_passes: int = 1  # forward passes of this batch (several only for decode-only batches)
    passes_kept: list[int] = field(default_factory=list)  # per seq: passes whose token it keeps
    overlaps_next: bool = False  # the next batch may be launched before this one's output is applied
    # per seq: whether its chunk reaches the end of its tokens, so that it samples one (fixed at scheduling)
    sampling: list[bool] = field(init=False)
    is_decode_only: bool = field(init=False)  # every sequence computes one token and samples the next

    def __post_init__(self) -> None:
        if not self.passes_kept:
            self.passes_kept = [1] * len(self.seqs)
        self.sampling = [c + n == len(s) for s, n, c in zip(self.seqs, self.num_new_tokens, self.num_computed_tokens)]
        self.is_decode_only = all(n == 1 for n in self.num_new_tokens) and all(self.sampling)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def sample_rows(self) -> list[int]:
        """The rows that sample, in batch order."""
        return [i for i, s in enumerate(self.sampling) if s]


@dataclass
class SchedulerStats:
    """Counters since the scheduler was made."""

    num_batches: int = 0
    num_mixed_batches: int = 0  # batches with both a decode and a prefill chunk
    num_chunked_batches: int = 0  # batches where a prefill chunk does not reach the end of its tokens
    max_batch_seqs: int = 0
    num_preemptions: int = 0


class Scheduler:
    """Owns the queues, the policy of scheduling ahead and the sequences' progress: it writes
    Sequence.status, num_computed_tokens, num_inflight_tokens, the received tokens, logprobs
    and the finish and stop reasons (the block manager writes the block table)."""

    def __init__(
        self,
        block_manager: BlockManager,
        stop_checker: StopChecker,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_decode_passes: int = 1,
        async_scheduling: bool = False,
    ) -> None:
        self.block_manager = block_manager
        self.stop_checker = stop_checker
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.num_decode_passes = num_decode_passes
        self.async_scheduling = async_scheduling
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.in_flight: ScheduledBatch | None = None  # launched, output not yet applied
        self.stats = SchedulerStats()

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
        still in flight are dropped; the batch that computes them writes only to blocks
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
        self.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        keys = [s.arrival for s in self.running]
        self.running.insert(bisect.bisect_right(keys, seq.arrival), seq)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """The next batch, or None when there is nothing to run before the batch in flight
        (if any) has been applied."""
        if self.in_flight is not None and not self._can_schedule_ahead():
            return None
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
            # a prompt whose logprobs are asked for is computed whole: cached blocks have no logits
            cached = bm.match_prefix(seq) if seq.params.prompt_logprobs is None else []
            n = min(len(seq) - len(cached) * bm.block_size, budget)
            if not bm.can_admit(seq, cached, n):
                break
            self.waiting.popleft()
            bm.admit(seq, cached)
            self._admit_running(seq)
            take(seq, n)

        if not scheduled:
            return None
        batch = ScheduledBatch(scheduled, new_tokens, computed)
        batch.overlaps_next = batch.is_decode_only and self.async_scheduling
        if batch.is_decode_only and self.num_decode_passes > 1 and not self.waiting:
            self._plan_passes(batch)
        self._count(batch)
        return batch

    def _can_schedule_ahead(self) -> bool:
        """Whether the next batch can be scheduled before the one in flight is applied: it then
        holds only decodes of running sequences (their input tokens are on the device), and
        needs no preemption (which would drop tokens in flight, whose draws a sequence's own
        generator has already made)."""
        if self.waiting:
            return False
        bm = self.block_manager
        need = 0
        for s in self.running:
            if s.num_uncomputed_tokens != 1:
                return False
            need += bm.num_new_blocks(s, 1)
        return need <= bm.num_free_blocks

    def reached_length_limit(self, seq: Sequence) -> bool:
        """Whether seq's tokens (those in flight included) reach its max_tokens or max_model_len."""
        p = seq.params
        return ((p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or len(seq) >= self.max_model_len)

    def _plan_passes(self, batch: ScheduledBatch) -> None:
        """Let a decode-only batch run several passes if every sequence can get the blocks.

        Sequence i keeps the tokens of its first passes_kept[i] passes: no more than its
        max_tokens or max_model_len allow. Sequences still under min_tokens (whose stop
        tokens are banned per token) keep single passes. Constrained ones run the window too:
        the model runner advances their grammars pass by pass.
        """
        bm = self.block_manager
        kept = []
        for seq in batch.seqs:
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                return
            n = min(self.num_decode_passes, self.max_model_len - len(seq))
            if p.max_tokens is not None:
                n = min(n, p.max_tokens - seq.num_output_tokens)
            kept.append(max(1, n))
        if max(kept) == 1:
            return
        # blocks for the extra passes: computed + 1 is already covered
        extra = sum(bm.num_new_blocks(s, n) for s, n in zip(batch.seqs, kept))
        if extra > bm.num_free_blocks:
            return
        for seq, n in zip(batch.seqs, kept):
            bm.append_slots(seq, n)
        batch.num_passes = max(kept)
        batch.passes_kept = kept

    def _count(self, batch: ScheduledBatch) -> None:
        st = self.stats
        st.num_batches += 1
        st.max_batch_seqs = max(st.max_batch_seqs, len(batch.seqs))
        decodes = [samples and n == 1 for samples, n in zip(batch.sampling, batch.num_new_tokens)]
        if any(decodes) and not all(decodes):
            st.num_mixed_batches += 1
        if not all(batch.sampling):
            st.num_chunked_batches += 1

    def launched(self, batch: ScheduledBatch) -> None:
        """The batch is on the device: pass k of seq i computes the K/V of its input token, for
        its first passes_kept[i] passes. Those tokens count as computed, and the tokens the
        batch samples as in flight until update_from_output() brings their values (and hashes the
        blocks they fill)."""
        for seq, n, kept, samples in zip(batch.seqs, batch.num_new_tokens, batch.passes_kept, batch.sampling):
            seq.num_computed_tokens += n + kept - 1
            if samples:
                seq.num_inflight_tokens += kept
        if batch.overlaps_next:
            self.in_flight = batch

    def update_from_output(self, batch: ScheduledBatch, outputs: list[PassOutput]) -> list[Sequence]:
        """Apply a launched batch's sampled tokens (outputs: one per pass), check stops, finish
        the sequences that stop. Seq i receives the tokens of its first passes_kept[i]
        passes, up to the first that stops it. Returns the sequences that received tokens."""
        if self.in_flight is batch:
            self.in_flight = None
        received = []
        for i, (seq, kept) in enumerate(zip(batch.seqs, batch.passes_kept)):
            if seq.status is not SequenceStatus.RUNNING:  # finished, aborted or preempted meanwhile
                continue
            if outputs[0].prompt_logprobs and i in outputs[0].prompt_logprobs:
                seq.prompt_logprobs.extend(outputs[0].prompt_logprobs[i])
            if not batch.sampling[i]:  # a prefill chunk before the end of its prompt
                self.block_manager.cache_full_blocks(seq)
                continue
            tokens = [outputs[k].token_ids[i] for k in range(kept)]
            p = seq.params
            if p.ignore_eos and not p.stop_token_ids and not p.stop_list and seq.grammar is None:
                # only a length can stop it, and the batch ends at or before that length
                if seq.logprobs is not None:
                    for k in range(kept):
                        lp, entry = outputs[k].logprobs[i]
                        seq.cumulative_logprob += lp
                        seq.logprobs.append(entry)
                self._receive(seq, tokens)
                self._check_stop(seq)
            else:
                for k, token in enumerate(tokens):
                    lp = outputs[k].logprobs[i]
                    if lp is not None and seq.logprobs is not None:
                        seq.cumulative_logprob += lp[0]
                        seq.logprobs.append(lp[1])
                    self._receive(seq, [token])
                    if self._check_stop(seq):
                        break
            received.append(seq)
        return received

    def _receive(self, seq: Sequence, tokens: list[int]) -> None:
        """The values of a running seq's oldest tokens in flight."""
        assert len(tokens) <= seq.num_inflight_tokens, f"{seq}: {len(tokens)} tokens for {seq.num_inflight_tokens}"
        seq.token_ids.extend(tokens)
        seq.num_inflight_tokens -= len(tokens)
        self.block_manager.cache_full_blocks(seq)

    def _check_stop(self, seq: Sequence) -> bool:
        """Finish seq if its last token stops it; True if it did."""
        stop = self.stop_checker.check(seq)
        if stop is None:
            return False
        self.finish(seq, stop[0])
        seq.stop_reason = stop[1]
        return True

    def check_integrity(self) -> None:
        """Block manager invariants over the sequences that hold blocks."""
        for seq in self.waiting:
            assert not seq.block_table, f"waiting {seq} holds blocks"
        for seq in self.all_seqs():
            assert seq.status is not SequenceStatus.FINISHED, f"finished {seq} is still queued"
        self.block_manager.check_integrity(s.block_table for s in self.running)
