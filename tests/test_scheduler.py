"""Scheduler over Sequences alone (no model): budgets, chunking, preemption, padding, leaks."""

from __future__ import annotations

import random

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.scheduler import Scheduler, pick_padded_size
from myvllm.runtime.sequence import Sequence, SequenceStatus
from myvllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, graph_sizes=None, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, max_seqs, budget, graph_sizes)


def add(sched: Scheduler, n_tokens: int, seq_id: int, max_tokens: int = 4) -> Sequence:
    s = Sequence(seq_id, str(seq_id), [seq_id * 1000 + i for i in range(n_tokens)],
                 SamplingParams(max_tokens=max_tokens), arrival=seq_id)
    sched.add(s)
    return s


def drive(sched: Scheduler, max_steps: int = 10_000) -> list:
    """Run to completion with fake sampling; finish each seq after max_tokens outputs."""
    batches = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert batch is not None, "unfinished sequences but nothing scheduled"
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(batch.seqs) <= sched.max_num_seqs
        batches.append(batch)
        sampled = [7 if batch.samples(i) else None for i in range(len(batch.seqs))]
        for s in sched.update(batch, sampled):
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
        sched.check_integrity()
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return batches


def test_decodes_come_first_and_prefills_are_chunked():
    sched = make(budget=8)
    a = add(sched, 3, 0)
    b1 = sched.schedule()
    assert b1.num_new_tokens == [3]
    sched.update(b1, [7])
    add(sched, 20, 1)
    b2 = sched.schedule()
    assert b2.seqs[0] is a and b2.num_new_tokens == [1, 7]  # decode, then a 7-token chunk
    assert not b2.is_decode_only and b2.samples(0) and not b2.samples(1)


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
    sched.update(batch, [7, 7])
    for _ in range(3):  # decodes: each needs a 3rd block at token 9 -> 6 blocks
        batch = sched.schedule()
        sched.update(batch, [7] * len(batch.seqs))
    assert sched.num_preemptions == 0
    for _ in range(4):
        batch = sched.schedule()
        sched.update(batch, [7 if batch.samples(i) else None for i in range(len(batch.seqs))])
        sched.check_integrity()
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the oldest keeps running
    drive(sched)


def test_decode_only_batches_are_padded_to_graph_sizes():
    sched = make(graph_sizes=[1, 2, 4, 8], max_seqs=8, budget=64)
    for i in range(3):
        add(sched, 5, i, max_tokens=3)
    first = sched.schedule()
    assert not first.is_decode_only and first.padded_batch_size == 3
    sched.update(first, [7, 7, 7])
    second = sched.schedule()
    assert second.is_decode_only and second.padded_batch_size == 4


def test_pick_padded_size():
    sizes = [1, 2, 4, 8, 16, 24]
    assert [pick_padded_size(n, sizes) for n in (1, 3, 8, 9, 24, 25)] == [1, 4, 8, 16, 24, 25]
    assert pick_padded_size(5, []) == 5


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
    """A window's tokens count as in flight at launch: the next schedule plans with them (the
    window after them, blocks included), a sequence they bring to max_tokens is not scheduled
    again, and receive_tokens moves them into token_ids and hashes the blocks they fill."""
    bm = BlockManager(64, 4, True)
    sched = Scheduler(bm, 8, 32, None, max_model_len=64, num_scheduler_steps=3)
    short, long = add(sched, 3, 0, max_tokens=4), add(sched, 3, 1, max_tokens=20)
    prefill = sched.schedule()
    sched.update(prefill, [5, 6])  # first tokens of both
    window = sched.schedule()
    assert window.num_steps == 3 and window.step_limits == [3, 3]
    sched.advance_window(window)  # launched: 3 tokens each in flight
    assert (len(short), len(short.token_ids), short.num_inflight_tokens) == (7, 4, 3)
    assert short.num_output_tokens == 4 and short.num_received_output_tokens == 1
    ahead = sched.schedule()  # planned before the window's tokens arrive
    assert ahead.seqs == [long], "short reached max_tokens through tokens in flight"
    assert ahead.num_computed_tokens == [6] and len(long.block_table) * 4 >= 6 + 3
    assert long.num_hashed_blocks == 0, "blocks are hashed when their tokens arrive"
    sched.advance_window(ahead)
    sched.receive_tokens(long, [11, 12, 13])  # the first window's values arrive
    assert long.token_ids[-4:] == [6, 11, 12, 13] and long.num_inflight_tokens == 3
    assert long.num_hashed_blocks == 1  # block 1 (positions 4..7) holds a token still in flight
    sched.receive_tokens(long, [14, 15, 16])
    assert long.num_hashed_blocks == 2 and long.num_inflight_tokens == 0
    sched.receive_tokens(short, [21, 22, 23])
    assert short.num_received_output_tokens == 4 and short.num_inflight_tokens == 0
    sched.check_integrity()


def test_preemption_and_finish_drop_tokens_in_flight():
    sched = make(num_blocks=64, block_size=4)
    a = add(sched, 3, 0, max_tokens=50)
    sched.update(sched.schedule(), [9])
    window = sched.schedule()
    sched.advance_window(window)
    assert a.num_inflight_tokens == 1
    sched.preempt(a)
    assert (a.num_inflight_tokens, len(a), a.block_table) == (0, 4, [])
    assert a.status is SequenceStatus.WAITING
    b = add(sched, 2, 1)
    sched.update(sched.schedule(), [3, 4])  # a recomputes its 4 known tokens, b prefills
    window = sched.schedule()
    sched.advance_window(window)
    sched.finish(b, "abort")
    assert b.num_inflight_tokens == 0 and not b.block_table
    sched.check_integrity()
