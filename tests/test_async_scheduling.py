"""Scheduling ahead: the next decode batch is launched before the previous one is read back.

With async_scheduling (the default) the engine schedules decode batch N+1 (a window of up to
num_decode_passes passes) while batch N's tokens are still in flight, feeds N's last tokens
to N+1 on the device, and reads N back afterwards. Outputs must equal those of the engine
that reads every batch back first, with stops inside a batch's passes (the sequence then ran
one extra batch for nothing), preemption of sequences whose tokens are in flight, logprobs,
n > 1 and seeded sampling; and an abort while a batch is in flight must free everything.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import SMALL_KV, run_checked

from myvllm import LLM, SamplingParams

BS = 16
ENGINE_KW = dict(kvcache_block_size=BS, max_model_len=96, num_decode_passes=4, **SMALL_KV)
VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Every test of this module runs torch on one thread (see conftest.one_thread)."""


def make_llm(path: str, async_scheduling: bool, **kw) -> LLM:
    llm = LLM(path, async_scheduling=async_scheduling, **{**ENGINE_KW, **kw})
    assert llm.engine.async_scheduling is async_scheduling
    return llm


@pytest.fixture(scope="module")
def sync_llm(tiny_model_dir) -> LLM:
    return make_llm(tiny_model_dir, False)


@pytest.fixture(scope="module")
def workload(sync_llm) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy requests that stop on a token they are known to produce (found by a first run),
    inside a window; seeded sampling with n=2; logprobs; min_tokens; plain lengths."""
    rng = random.Random(3)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(16)]
    probe = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    probe_outs = sync_llm.generate(prompts, probe, use_tqdm=False)
    params = []
    for i, out in enumerate(probe_outs):
        tokens = out.outputs[0].token_ids
        kind = i % 4
        if kind == 0:  # stops at the first occurrence of a token it produces, mid-window
            params.append(SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tokens[rng.randint(5, 30)]]))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=rng.randint(1, 40),
                                         ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(temperature=0, logprobs=2, max_tokens=rng.randint(1, 30),
                                         stop_token_ids=[tokens[rng.randint(2, 39)]]))
        else:
            params.append(SamplingParams(temperature=1.0, seed=100 + i, min_tokens=3, max_tokens=rng.randint(3, 40),
                                         stop_token_ids=[tokens[7]]))
    return prompts, params


LOGPROB_ATOL = 1e-4  # float32: a preempted sequence is recomputed in other batch shapes


def key(outs) -> list:
    """Everything of the outputs that must be identical: ids, finish and stop reasons, and which
    tokens each logprobs entry names (the values are compared by logprobs())."""
    return [[(c.index, c.token_ids, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [sorted(d) for d in c.logprobs])
             for c in o.outputs] for o in outs]


def logprobs(outs) -> list[float]:
    return [lp.logprob for o in outs for c in o.outputs for d in c.logprobs or [] for _, lp in sorted(d.items())]


@pytest.fixture(scope="module")
def expected(sync_llm, workload):
    prompts, params = workload
    outs = run_checked(sync_llm, prompts, params)
    return key(outs), logprobs(outs)


@pytest.mark.parametrize("num_kv_blocks", [None, 7], ids=["ample-pool", "tight-pool"])
def test_async_equals_sync(tiny_model_dir, workload, expected, num_kv_blocks):
    llm = make_llm(tiny_model_dir, True, num_kv_blocks=num_kv_blocks)
    prompts, params = workload
    outs = run_checked(llm, prompts, params)
    assert key(outs) == expected[0]
    assert logprobs(outs) == pytest.approx(expected[1], abs=LOGPROB_ATOL)
    stops = [c.finish_reason for o in outs for c in o.outputs]
    assert stops.count("stop") >= 4, "the workload must stop some sequences inside a window"
    if num_kv_blocks is not None:
        assert llm.engine.get_stats()["num_preemptions"] > 0, "the tight pool must preempt"
    assert llm.engine._in_flight is None or all(s.is_finished for s in llm.engine._in_flight.batch.seqs)


def count_overlaps(llm: LLM, prompts, params) -> tuple[int, int]:
    """(windows launched while another was not yet read back, windows launched)."""
    runner = llm.engine.runner
    launch, collect = runner.execute, runner.collect
    open_windows: set[int] = set()
    counts = [0, 0]

    def launching(batch, prev=None):
        window = launch(batch, prev)
        if batch.is_decode_only:
            counts[0] += bool(open_windows)
            counts[1] += 1
            open_windows.add(id(window))
        return window

    def collecting(window):
        open_windows.discard(id(window))
        return collect(window)

    runner.execute, runner.collect = launching, collecting
    try:
        run_checked(llm, prompts, params)
    finally:
        runner.execute, runner.collect = launch, collect
    return counts[0], counts[1]


def test_windows_overlap_only_with_async_scheduling(tiny_model_dir, sync_llm):
    prompts = [[5 + i, 9, 13] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    overlapped, launched = count_overlaps(make_llm(tiny_model_dir, True), prompts, params)
    assert launched >= 14 and overlapped >= launched - 2  # all but the first and a last one
    assert count_overlaps(sync_llm, prompts, params)[0] == 0


def test_abort_while_a_window_is_in_flight(tiny_model_dir, sync_llm):
    llm = make_llm(tiny_model_dir, True)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    keep, drop = [[21, 22, 23]], [[31, 32]]
    ids = [engine.add_request(p, params) for p in keep + drop]
    while engine._in_flight is None or not engine.requests[ids[1]].seqs[0].num_inflight_tokens:
        engine.step()
    partial = engine.abort_request(ids[1])
    assert partial.outputs[0].finish_reason == "abort"
    assert len(partial.outputs[0].token_ids) < 50
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
        engine.check_integrity()
    assert key([results[ids[0]]]) == key(sync_llm.generate(keep, params, use_tqdm=False))
    assert not engine.requests
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_nothing_stays_in_flight_once_every_request_finished(tiny_model_dir, sync_llm):
    """A request that stops on a token inside a window finishes while the next window (launched
    ahead) is in flight; the engine applies that window too before it idles, so none of the
    finished request's state stays referenced while it waits for new ones."""
    import gc

    from myvllm.runtime.sequence import Sequence

    prompt = [[7, 8, 9, 10]]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens = sync_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop = next(t for i, t in enumerate(tokens) if i >= 9 and t not in tokens[:i])  # first seen after a few windows
    llm = make_llm(tiny_model_dir, True)
    engine = llm.engine
    engine.add_request(prompt[0], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine._in_flight is None and engine.scheduler.in_flight is None
    gc.collect()
    assert not any(type(o) is Sequence for o in gc.get_objects()), "a finished request's Sequence lives on"
