"""Scheduler over Sequences alone (no model): budgets, chunking, preemption, tokens in flight, leaks."""

from __future__ import annotations

import random

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.scheduler import ScheduledBatch, Scheduler
from myvllm.runtime.sequence import Sequence, SequenceStatus
from myvllm.runtime.stop_checker import StopChecker
from myvllm.sample.output import PassOutput
from myvllm.sampling_params import SamplingParams

MAX_MODEL_LEN = 1 << 20


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, caching=True, max_model_len=MAX_MODEL_LEN,
         num_decode_passes=1, async_scheduling=False):
    bm = BlockManager(num_blocks, block_size, caching)
    stops = StopChecker(set(), max_model_len, None)  # only lengths stop: max_tokens, max_model_len
    return Scheduler(bm, stops, max_seqs, budget, max_model_len, num_decode_passes, async_scheduling)


def launch(sched: Scheduler, batch: ScheduledBatch) -> ScheduledBatch:
    sched.launched(batch)
    return batch


def outputs(batch: ScheduledBatch, tokens) -> list[PassOutput]:
    """One PassOutput per pass; tokens: one token per row (every pass), or per pass a list per row."""
    per_pass = [[tokens] * len(batch.seqs)] * batch.num_passes if isinstance(tokens, int) else tokens
    return [PassOutput([t if batch.sampling[i] else None for i, t in enumerate(row)], [None] * len(row))
            for row in per_pass]


def update(sched: Scheduler, batch: ScheduledBatch, tokens=7) -> list[Sequence]:
    """Launch batch and apply its sampled tokens (`tokens` as for outputs())."""
    launch(sched, batch)
    return sched.update_from_output(batch, outputs(batch, tokens))


def add(sched: Scheduler, n_tokens: int, seq_id: int, max_tokens: int = 4) -> Sequence:
    s = Sequence(seq_id, str(seq_id), [seq_id * 1000 + i for i in range(n_tokens)],
                 SamplingParams(max_tokens=max_tokens), arrival=seq_id)
    sched.add(s)
    return s


def drive(sched: Scheduler, max_steps: int = 10_000) -> list:
    """Run to completion with fake sampling; each seq finishes after max_tokens outputs."""
    batches = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert batch is not None, "unfinished sequences but nothing scheduled"
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(batch.seqs) <= sched.max_num_seqs
        batches.append(batch)
        update(sched, batch)  # sequences finish at max_tokens
        sched.check_integrity()
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return batches


def test_decodes_come_first_and_prefills_are_chunked():
    sched = make(budget=8)
    a = add(sched, 3, 0)
    b1 = sched.schedule()
    assert b1.num_new_tokens == [3]
    update(sched, b1)
    add(sched, 20, 1)
    b2 = sched.schedule()
    assert b2.seqs[0] is a and b2.num_new_tokens == [1, 7]  # decode, then a 7-token chunk
    assert not b2.is_decode_only and b2.sampling == [True, False]


def test_all_finish_and_no_leak_under_random_load():
    rng = random.Random(0)
    sched = make(num_blocks=40, block_size=4, max_seqs=6, budget=16)
    for i in range(30):
        add(sched, rng.randint(1, 30), i, max_tokens=rng.randint(1, 12))
    drive(sched)


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = make(num_blocks=6, block_size=4, max_seqs=4, budget=64)
    a, b = add(sched, 8, 0, max_tokens=14), add(sched, 8, 1, max_tokens=14)
    batch = sched.schedule()  # both admitted: 4 blocks used
    update(sched, batch)
    for _ in range(3):  # decodes: each needs a 3rd block at token 9 -> 6 blocks
        update(sched, sched.schedule())
    assert sched.stats.num_preemptions == 0
    for _ in range(4):
        update(sched, sched.schedule())
        sched.check_integrity()
    assert sched.stats.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the oldest keeps running
    drive(sched)


def test_a_decode_only_batch_runs_several_passes_within_each_sequences_limits():
    sched = make(max_seqs=8, budget=64, num_decode_passes=4, max_model_len=12)
    a, b = add(sched, 5, 0, max_tokens=3), add(sched, 5, 1, max_tokens=30)
    first = sched.schedule()
    assert not first.is_decode_only and first.num_passes == 1
    update(sched, first)
    second = sched.schedule()
    # a may keep 2 more tokens (max_tokens 3), b 4 (max_model_len 12 leaves 6)
    assert second.is_decode_only and second.num_passes == 4 and second.passes_kept == [2, 4]
    update(sched, second, [[7, 8]] * 4)
    assert a.output_token_ids == [7, 7, 7] and a.finish_reason == "length"
    assert b.output_token_ids == [7, 8, 8, 8, 8]


def test_abort_waiting_and_running_frees_blocks():
    sched = make(max_seqs=1)
    a, b = add(sched, 6, 0), add(sched, 6, 1)
    batch = sched.schedule()
    assert batch.seqs == [a]
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert not sched.has_unfinished()
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort"
    sched.check_integrity()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_fifo_admission():
    sched = make(max_seqs=2, budget=1000)
    seqs = [add(sched, 4, i, max_tokens=2) for i in range(6)]
    admitted = []
    for batch in drive(sched):
        for s in batch.seqs:
            if s not in admitted:
                admitted.append(s)
    assert admitted == seqs


def test_tokens_in_flight_are_planned_with_and_received_later():
    """A batch's tokens count as in flight at launch: the next schedule plans with them (the
    batch after them, blocks included), a sequence they bring to max_tokens is not scheduled
    again, and update_from_output moves them into token_ids and hashes the blocks they fill."""
    sched = make(num_decode_passes=3, max_model_len=64, async_scheduling=True)
    short, long = add(sched, 3, 0, max_tokens=4), add(sched, 3, 1, max_tokens=20)
    prefill = sched.schedule()
    update(sched, prefill, [[5, 6]])  # first tokens of both
    window = sched.schedule()
    assert window.num_passes == 3 and window.passes_kept == [3, 3] and window.overlaps_next
    launch(sched, window)  # 3 tokens each in flight
    assert sched.in_flight is window
    assert (len(short), len(short.token_ids), short.num_inflight_tokens) == (7, 4, 3)
    assert short.num_output_tokens == 4 and short.num_received_output_tokens == 1
    ahead = sched.schedule()  # planned before the window's tokens arrive
    assert ahead.seqs == [long], "short reached max_tokens through tokens in flight"
    assert ahead.num_computed_tokens == [6] and len(long.block_table) * 4 >= 6 + 3
    assert long.num_hashed_blocks == 0, "blocks are hashed when their tokens arrive"
    launch(sched, ahead)
    sched.update_from_output(window, outputs(window, [[21, 11], [22, 12], [23, 13]]))  # the first window's values
    assert long.token_ids[-4:] == [6, 11, 12, 13] and long.num_inflight_tokens == 3
    assert long.num_hashed_blocks == 1  # block 1 (positions 4..7) holds a token still in flight
    assert short.num_received_output_tokens == 4 and short.num_inflight_tokens == 0
    assert short.finish_reason == "length"
    sched.update_from_output(ahead, outputs(ahead, [[14], [15], [16]]))
    assert long.num_hashed_blocks == 2 and long.num_inflight_tokens == 0
    assert sched.in_flight is None
    sched.check_integrity()


def test_nothing_is_scheduled_ahead_of_a_batch_in_flight_while_a_prompt_waits():
    sched = make(async_scheduling=True)
    a = add(sched, 3, 0, max_tokens=10)
    update(sched, sched.schedule())
    decode = launch(sched, sched.schedule())
    assert decode.overlaps_next and a.num_inflight_tokens == 1
    add(sched, 5, 1)
    assert sched.schedule() is None, "the prompt must wait for the tokens in flight"
    sched.update_from_output(decode, outputs(decode, 7))
    batch = sched.schedule()
    assert batch is not None and batch.num_new_tokens == [1, 5]


def test_preemption_and_finish_drop_tokens_in_flight():
    sched = make(num_blocks=64, block_size=4)
    a = add(sched, 3, 0, max_tokens=50)
    update(sched, sched.schedule(), 9)
    launch(sched, sched.schedule())
    assert a.num_inflight_tokens == 1
    sched.preempt(a)
    assert (a.num_inflight_tokens, len(a), a.block_table) == (0, 4, [])
    assert a.status is SequenceStatus.WAITING
    b = add(sched, 2, 1)
    batch = sched.schedule()  # a recomputes its 4 known tokens, b prefills
    assert batch.num_new_tokens == [4, 2]
    update(sched, batch, [[3, 4]])
    launch(sched, sched.schedule())
    sched.finish(b, "abort")
    assert b.num_inflight_tokens == 0 and not b.block_table
    sched.check_integrity()
