"""Scheduler + BlockManager under random workloads (no model), invariants checked every step.

A workload is a list of requests arriving over time: prompt lengths, shared prefixes,
max_tokens, an optional early stop (like an EOS) and an optional abort at a random step,
served with a random KV pool (never smaller than one longest sequence needs), token
budget, max_num_seqs, block size, prefix caching on or off and single- or multi-step
decoding. A fake model samples a token that depends only on the sequence's content, so
equal prompts continue equally and generated blocks are prefix-cache hits too.

Checked after every step:
  - BlockManager.check_integrity (ref counts equal holders, free lists, hash maps);
  - a simulated KV cache: every computed position of every running sequence holds that
    sequence's token (so a prefix-cache hit, a shared block or a reused block never
    serves another sequence's data);
  - no sequence is both waiting and running, statuses match the queues, finished
    sequences hold no blocks, the running list is in arrival order, never-admitted
    waiting sequences are a suffix in arrival order;
  - the batch respects the token budget and max_num_seqs;
  - the run ends within a step bound (a generous linear function of the total tokens):
    no request waits forever;
  - first admissions follow arrival order (FIFO);
  - each request that is not aborted ends with exactly the tokens it asked for
    (max_tokens, max_model_len or its stop position), each aborted one holds no blocks.

`pytest -rP` prints the budget that ran (examples, steps, preemptions, cache hits).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.scheduler import Scheduler
from myvllm.runtime.sequence import Sequence, SequenceStatus
from myvllm.sample.output import PassOutput
from myvllm.sampling_params import SamplingParams

CI_EXAMPLES = 120
SLOW_EXAMPLES = 5000


@dataclass
class Request:
    arrival_step: int
    prompt: list[int]
    max_tokens: int
    stop_at: int | None  # finishes with "stop" after this many output tokens (an EOS)
    abort_after: int | None  # aborted this many steps after arrival, if still unfinished
    seq: Sequence | None = None


@dataclass
class Workload:
    requests: list[Request]
    block_size: int
    num_blocks: int
    max_num_seqs: int
    budget: int
    prefix_caching: bool
    num_decode_passes: int
    max_model_len: int


@dataclass
class FuzzStats:
    examples: int = 0
    requests: int = 0
    steps: int = 0
    multi_step_batches: int = 0
    preemptions: int = 0
    aborts: int = 0
    hit_tokens: int = 0
    max_steps_per_token: float = 0.0

    def summary(self, name: str) -> str:
        return (f"{name}: {self.examples} examples, {self.requests} requests, {self.steps} scheduler steps "
                f"({self.multi_step_batches} multi-step batches), {self.preemptions} preemptions, "
                f"{self.aborts} aborts, {self.hit_tokens} prefix-cache hit tokens, "
                f"max steps per token {self.max_steps_per_token:.2f}")


@st.composite
def workloads(draw) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    # shared prefixes of up to three blocks (plus a partial one)
    prefixes = [[10_000 * (p + 1) + j for j in range(draw(st.integers(1, 3 * block_size + 3)))]
                for p in range(draw(st.integers(0, 3)))]
    requests = []
    t = 0
    for i in range(draw(st.integers(1, 20))):
        t += draw(st.sampled_from([0, 0, 0, 1, 2, 5]))
        prompt: list[int] = []
        if prefixes and draw(st.booleans()):
            prefix = draw(st.sampled_from(prefixes))
            prompt = prefix[:draw(st.integers(1, len(prefix)))]
        own = draw(st.integers(0 if prompt else 1, 40))
        if own and prompt and draw(st.integers(0, 3)) == 0:
            prompt = prompt + prompt[:own]  # repeats: equal prompts, equal continuations
        else:
            prompt = prompt + [1_000_000 + 1000 * i + j for j in range(own)]
        max_tokens = draw(st.integers(1, 24))
        stop_at = draw(st.one_of(st.none(), st.none(), st.integers(1, max_tokens)))
        abort_after = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 30)))
        requests.append(Request(t, prompt, max_tokens, stop_at, abort_after))
    longest_prompt = max(len(r.prompt) for r in requests)
    longest_total = max(len(r.prompt) + r.max_tokens for r in requests)
    max_model_len = draw(st.integers(longest_prompt + 1, longest_total + 1))
    longest = min(longest_total, max_model_len)
    need = -(-longest // block_size)
    return Workload(
        requests=requests,
        block_size=block_size,
        num_blocks=need + draw(st.integers(0, 3 * need)),
        max_num_seqs=draw(st.integers(1, 8)),
        budget=draw(st.integers(1, 64)),
        prefix_caching=draw(st.sampled_from([True, True, False])),
        num_decode_passes=draw(st.sampled_from([1, 1, 2, 8])),
        max_model_len=max_model_len,
    )


def fake_tokens(seq: Sequence, n: int) -> list[int]:
    """A 'model': the next n tokens, each depending only on the sequence's content before it."""
    tokens = list(seq.token_ids)
    for _ in range(n):
        tokens.append(7 + (tokens[-1] * 31 + len(tokens) * 17) % 101)
    return tokens[len(seq.token_ids):]


class WorkloadStops:
    """The workload's stop rules, as the scheduler's stop checker: a request may stop after
    stop_at tokens ("stop"), else at max_tokens or max_model_len ("length")."""

    def __init__(self, reqs: list[Request], max_model_len: int) -> None:
        self.reqs, self.max_model_len = reqs, max_model_len

    def check(self, seq: Sequence) -> tuple[str, None] | None:
        r = self.reqs[int(seq.request_id)]
        n = seq.num_received_output_tokens
        if r.stop_at is not None and n == r.stop_at:
            return "stop", None
        if n >= r.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length", None
        return None


def expected_outputs(r: Request, max_model_len: int) -> tuple[int, str]:
    n = min(r.max_tokens, max_model_len - len(r.prompt))
    if r.stop_at is not None and r.stop_at <= n:
        return r.stop_at, "stop"
    return n, "length"


def check_state(sched: Scheduler, kv: dict[tuple[int, int], int], reqs: list[Request]) -> None:
    sched.check_integrity()
    bm = sched.block_manager
    running_ids = [s.seq_id for s in sched.running]
    waiting_ids = [s.seq_id for s in sched.waiting]
    assert len(set(running_ids)) == len(running_ids), "a sequence is twice in running"
    assert len(set(waiting_ids)) == len(waiting_ids), "a sequence is twice in waiting"
    assert not set(running_ids) & set(waiting_ids), "a sequence is both waiting and running"
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
    assert all(s.status is SequenceStatus.WAITING for s in sched.waiting)
    arrivals = [s.arrival for s in sched.running]
    assert arrivals == sorted(arrivals), "running sequences are not in arrival order"
    fresh = [i for i, s in enumerate(sched.waiting) if s.num_preemptions == 0 and s.num_computed_tokens == 0]
    fresh_arrivals = [sched.waiting[i].arrival for i in fresh]
    assert fresh_arrivals == sorted(fresh_arrivals), "never-admitted requests are out of arrival order"
    assert fresh == list(range(len(sched.waiting) - len(fresh), len(sched.waiting))), \
        "a preempted request sits behind a never-admitted one"
    live = set(running_ids) | set(waiting_ids)
    for r in reqs:
        s = r.seq
        if s is None:
            continue
        if s.seq_id not in live:
            assert s.status is SequenceStatus.FINISHED and not s.block_table, f"{s} left the queues unfinished"
    for s in sched.running:
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        for p in range(s.num_computed_tokens):
            slot = (s.block_table[p // bm.block_size], p % bm.block_size)
            assert kv.get(slot) == s.token_ids[p], (
                f"{s}: position {p} reads {kv.get(slot)} from block {slot[0]}, expected {s.token_ids[p]}")


def simulate(w: Workload, stats: FuzzStats | None = None) -> int:
    """Serve the workload to the end, checking invariants each step; returns the steps taken."""
    bm = BlockManager(w.num_blocks, w.block_size, w.prefix_caching)
    reqs = w.requests
    sched = Scheduler(bm, WorkloadStops(reqs, w.max_model_len), w.max_num_seqs, w.budget, w.max_model_len,
                      w.num_decode_passes)
    kv: dict[tuple[int, int], int] = {}  # (block, offset) -> token whose K/V it holds
    total_tokens = sum(len(r.prompt) + r.max_tokens for r in reqs)
    last_arrival = reqs[-1].arrival_step
    # Each step computes at least one token; preemption recomputes, aborts only shorten.
    step_bound = last_arrival + 2 + 4 * total_tokens
    admitted: list[Sequence] = []
    seen: set[int] = set()
    next_req = 0
    step = 0
    multi = 0
    aborts = 0

    while True:
        while next_req < len(reqs) and reqs[next_req].arrival_step <= step:
            r = reqs[next_req]
            # a stop token that never comes keeps the per-token stop checks of requests with stop_at
            never = None if r.stop_at is None else [1 << 30]
            params = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, stop_token_ids=never)
            r.seq = Sequence(next_req, str(next_req), r.prompt, params, arrival=next_req)
            sched.add(r.seq)
            next_req += 1
        for r in reqs[:next_req]:
            if r.abort_after is not None and r.arrival_step + r.abort_after == step and not r.seq.is_finished:
                sched.finish(r.seq, "abort")
                aborts += 1
                assert not r.seq.block_table
        if next_req == len(reqs) and not sched.has_unfinished():
            break
        assert step <= step_bound, f"no end after {step} steps: a request waits forever? {sched.waiting}"
        batch = sched.schedule()
        step += 1
        if batch is None:
            assert not sched.has_unfinished(), "unfinished sequences but nothing scheduled"
            check_state(sched, kv, reqs)
            continue
        ids = [s.seq_id for s in batch.seqs]
        assert len(set(ids)) == len(ids), "a sequence is twice in one batch"
        assert batch.num_tokens <= w.budget and len(batch.seqs) <= w.max_num_seqs
        assert all(n >= 1 for n in batch.num_new_tokens)
        assert all(s.status is SequenceStatus.RUNNING for s in batch.seqs)
        assert batch.num_computed_tokens == [s.num_computed_tokens for s in batch.seqs]
        for s in batch.seqs:
            if s.seq_id not in seen:
                seen.add(s.seq_id)
                admitted.append(s)
        if batch.num_passes > 1:
            multi += 1
            assert batch.is_decode_only and len(batch.passes_kept) == len(batch.seqs)
        # the engine's order: launch (tokens in flight), then the tokens of every pass arrive
        starts = [s.num_computed_tokens for s in batch.seqs]
        known = [list(s.token_ids) for s in batch.seqs]
        sampled = [fake_tokens(s, batch.num_passes) if batch.sampling[i] else [None] * batch.num_passes
                   for i, s in enumerate(batch.seqs)]
        sched.launched(batch)
        passes = [PassOutput([row[k] for row in sampled], [None] * len(sampled)) for k in range(batch.num_passes)]
        sched.update_from_output(batch, passes)
        for i, (s, c0, n, kept) in enumerate(zip(batch.seqs, starts, batch.num_new_tokens, batch.passes_kept)):
            # the K/V each pass computed: its chunk, or the input token of each pass kept, until the seq stopped
            tokens = known[i] + [t for t in sampled[i] if t is not None]
            end = c0 + n if batch.num_passes == 1 else c0 + min(kept, len(s.token_ids) - len(known[i]))
            assert len(s.block_table) * w.block_size >= end or s.is_finished, f"{s} computes past its blocks"
            for p in range(c0, end if s.status is SequenceStatus.RUNNING else c0):
                kv[(s.block_table[p // w.block_size], p % w.block_size)] = tokens[p]
        check_state(sched, kv, reqs)

    # FIFO: first admissions follow arrival order
    assert [s.arrival for s in admitted] == sorted(s.arrival for s in admitted)
    for r in reqs:
        s = r.seq
        assert s.is_finished and not s.block_table
        if s.finish_reason == "abort":
            continue
        n, reason = expected_outputs(r, w.max_model_len)
        assert (s.num_output_tokens, s.finish_reason) == (n, reason), f"request {s.request_id}"
        assert s.token_ids[:len(r.prompt)] == r.prompt
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)
    bm.check_integrity([])
    if stats is not None:
        stats.examples += 1
        stats.requests += len(reqs)
        stats.steps += step
        stats.multi_step_batches += multi
        stats.preemptions += sched.stats.num_preemptions
        stats.aborts += aborts
        stats.hit_tokens += bm.num_hits
        stats.max_steps_per_token = max(stats.max_steps_per_token, (step - last_arrival) / total_tokens)
    return step


def run_fuzz(max_examples: int) -> FuzzStats:
    stats = FuzzStats()

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(workloads())
    def check(w: Workload) -> None:
        simulate(w, stats)

    check()
    return stats


def test_fuzz_scheduler():
    stats = run_fuzz(CI_EXAMPLES)
    print(stats.summary("fuzz (CI)"))
    assert stats.examples >= CI_EXAMPLES // 2
    assert stats.preemptions > 0 and stats.hit_tokens > 0 and stats.aborts > 0 and stats.multi_step_batches > 0


@pytest.mark.slow
def test_fuzz_scheduler_long():
    stats = run_fuzz(SLOW_EXAMPLES)
    print(stats.summary("fuzz (slow)"))
    assert stats.examples >= SLOW_EXAMPLES // 2


def test_simulation_catches_a_block_handed_to_two_sequences(monkeypatch):
    """The checks above are not vacuous: a block manager that hands out a block twice fails."""
    original = BlockManager._take_free_block

    def leaky(self):
        block = original(self)
        if self.free_empty:
            self.free_empty.appendleft(block)  # the block stays free while it is used
        return block

    monkeypatch.setattr(BlockManager, "_take_free_block", leaky)
    w = Workload([Request(0, list(range(1, 9)), 4, None, None), Request(0, list(range(20, 29)), 4, None, None)],
                 block_size=4, num_blocks=16, max_num_seqs=4, budget=64, prefix_caching=False,
                 num_decode_passes=1, max_model_len=64)
    with pytest.raises(AssertionError):
        simulate(w)


def test_simulation_handles_preemption_and_multi_step():
    """A fixed workload that preempts and runs multi-step batches, with equal prompts."""
    prompt = list(range(100, 118))
    reqs = [Request(0, prompt, 12, None, None), Request(0, prompt, 12, None, None),
            Request(1, list(range(200, 203)), 20, 5, None), Request(2, prompt[:9], 8, None, 3)]
    w = Workload(reqs, block_size=4, num_blocks=8, max_num_seqs=4, budget=16, prefix_caching=True,
                 num_decode_passes=4, max_model_len=40)
    stats = FuzzStats()
    simulate(w, stats)
    assert stats.preemptions > 0 and stats.multi_step_batches > 0 and stats.hit_tokens > 0
