"""Soak: thousands of small requests through one engine, bounded in time.

Rounds alternate between `LLM.generate` batches and the engine API (add_request, step,
abort_request at random moments, some streaming requests). Requests mix greedy and
sampled (seeded and not) decoding, n=1 and 2, logprobs, stop strings, EOS, text and
token prompts of 1..40 tokens and max_tokens 1..16, through a KV pool small enough to
preempt. Checked:

  - no lost request: every request gets exactly one final output, with the token count
    its parameters ask for (exact under ignore_eos without stop strings);
  - greedy and seeded outputs of the same prompt agree (one is a prefix of the other),
    whatever the batch, preemption or prefix-cache state;
  - integrity after every step; after every round no request, no sampling generator and
    no block is left, and no Sequence object survives;
  - memory is stable after warm-up: resident set size, Python object counts.

`pytest -rP tests/test_soak.py` prints the figures (requests, steps, time, RSS).
"""

from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import dataclass, field

import pytest
from engine_utils import SMALL_KV
from tiny_model import WORDS

from myvllm import LLM, SamplingParams
from myvllm.runtime.sequence import Sequence

MAX_LEN = 64
SOAK_KW = dict(kvcache_block_size=16, max_model_len=MAX_LEN, num_kv_blocks=24, max_num_seqs=16,
               max_num_batched_tokens=128, **SMALL_KV)
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Every test of this module runs torch on one thread (see conftest.one_thread)."""


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def live_sequences() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Sequence)


@dataclass
class Req:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool = False
    abort_at_step: int | None = None  # engine rounds: abort after this many steps, if unfinished
    reused: bool = False  # a prompt of the pool: its greedy / seeded outputs are compared across rounds
    request_id: str | None = None


@dataclass
class SoakStats:
    requests: int = 0
    aborted: int = 0
    rounds: int = 0
    steps: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    seconds: float = 0.0
    rss_warm: float = 0.0
    rss_end: float = 0.0
    rss_max: float = 0.0
    objects_warm: int = 0
    objects_end: int = 0
    rss_samples: list[float] = field(default_factory=list)

    def summary(self, name: str) -> str:
        return (f"{name}: {self.requests} requests ({self.aborted} aborted) in {self.rounds} rounds, "
                f"{self.steps} engine steps, {self.output_tokens} output tokens, {self.preemptions} preemptions, "
                f"{self.seconds:.1f} s ({self.requests / max(self.seconds, 1e-9):.0f} requests/s); "
                f"RSS after warm-up {self.rss_warm:.1f} MiB, at the end {self.rss_end:.1f} MiB "
                f"(max {self.rss_max:.1f}); Python objects {self.objects_warm} -> {self.objects_end}")


class Soak:
    def __init__(self, llm: LLM, seed: int) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.rng = random.Random(seed)
        rng = random.Random(seed + 1)
        # reused prompts: equal prompts must give equal greedy / seeded outputs, and hit the prefix cache
        self.pool = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 40))] for _ in range(30)]
        self.texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(10)]
        self.seen: dict[tuple, list[int]] = {}  # deterministic request key -> longest output seen
        self.stats = SoakStats()
        self._step = self.engine.step

    # ---- requests ----------------------------------------------------------------------------

    def make(self) -> Req:
        rng = self.rng
        r = rng.random()
        reused = r < 0.5
        if r < 0.4:
            prompt = list(rng.choice(self.pool))
        elif r < 0.5:
            prompt = rng.choice(self.texts)
        else:
            prompt = [rng.randrange(0, 512) for _ in range(rng.randint(1, 40))]
        max_tokens = rng.randint(1, 16)
        kind = rng.random()
        if kind < 0.35:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        elif kind < 0.45:
            p = SamplingParams(temperature=0, max_tokens=max_tokens)
        elif kind < 0.6:
            p = SamplingParams(temperature=0.8, top_p=0.95, seed=rng.randrange(3), n=rng.choice([1, 2]),
                               max_tokens=max_tokens, ignore_eos=True)
        elif kind < 0.8:
            p = SamplingParams(temperature=1.0, top_k=50, min_p=0.02, n=rng.choice([1, 2]), max_tokens=max_tokens,
                               min_tokens=rng.randint(0, max_tokens))
        elif kind < 0.9:
            p = SamplingParams(temperature=0, logprobs=2, max_tokens=max_tokens, ignore_eos=True)
        else:
            p = SamplingParams(temperature=0.7, stop=[" the", "s"], max_tokens=max_tokens, seed=rng.randrange(100))
        return Req(prompt, p, reused=reused)

    def check(self, req: Req, out, aborted: bool) -> None:
        p = req.params
        assert out.finished, f"request {out.request_id} is not finished"
        assert sorted(c.index for c in out.outputs) == list(range(p.n))
        room = min(p.max_tokens, MAX_LEN - len(out.prompt_token_ids))
        for c in out.outputs:
            n = len(c.token_ids)
            self.stats.output_tokens += n
            assert n <= room
            if c.finish_reason == "abort":
                assert aborted
                continue
            assert c.finish_reason in ("length", "stop"), c.finish_reason
            if c.finish_reason == "length":
                assert n == room
            else:
                assert n >= p.min_tokens
            if p.ignore_eos and not p.stop:
                assert (n, c.finish_reason) == (room, "length")
            if p.logprobs is not None:
                assert len(c.logprobs) == n
            if req.reused and p.ignore_eos and (p.temperature == 0 or p.seed is not None):
                key = (tuple(out.prompt_token_ids), p.temperature, p.top_p, p.seed, c.index)
                prev = self.seen.get(key, [])
                short, long = sorted((prev, c.token_ids), key=len)
                assert long[:len(short)] == short, f"outputs for one prompt differ: {prev} vs {c.token_ids}"
                self.seen[key] = long

    # ---- rounds ------------------------------------------------------------------------------

    def checked_step(self):
        outs = self._step()
        self.engine.check_integrity()
        self.stats.steps += 1
        return outs

    def generate_round(self, size: int) -> None:
        reqs = [self.make() for _ in range(size)]
        outs = self.llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)
        assert len(outs) == size and len({o.request_id for o in outs}) == size
        for r, o in zip(reqs, outs):
            self.check(r, o, aborted=False)
        self.stats.requests += size

    def engine_round(self, size: int) -> None:
        """Requests arrive between steps; some stream, some are aborted wherever they are."""
        engine, rng = self.engine, self.rng
        pending = [self.make() for _ in range(size)]
        for r in pending:
            r.stream = rng.random() < 0.1
            if rng.random() < 0.15:
                r.abort_at_step = rng.randint(0, 12)
        reqs: dict[str, Req] = {}
        added_at: dict[str, int] = {}
        finals: dict[str, object] = {}
        aborted: set[str] = set()
        step = 0
        while pending or engine.has_unfinished_requests():
            for _ in range(rng.randint(0, 4)):  # arrivals between steps
                if pending:
                    r = pending.pop()
                    r.request_id = engine.add_request(r.prompt, r.params, stream=r.stream)
                    reqs[r.request_id], added_at[r.request_id] = r, step
            for rid, r in reqs.items():
                if r.abort_at_step is not None and rid not in finals and step - added_at[rid] >= r.abort_at_step:
                    out = engine.abort_request(rid)
                    assert out is not None, f"request {rid} vanished from the engine"
                    finals[rid] = out
                    aborted.add(rid)
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in finals, f"request {out.request_id} has two final outputs"
                    finals[out.request_id] = out
                else:
                    assert reqs[out.request_id].stream
            step += 1
        assert sorted(finals) == sorted(reqs), "a request was lost"
        for rid, out in finals.items():
            assert out.request_id == rid
            self.check(reqs[rid], out, aborted=rid in aborted)
        self.stats.aborted += len(aborted)
        self.stats.requests += size

    def run(self, max_requests: int, seconds: float, warmup_requests: int) -> SoakStats:
        engine, stats = self.engine, self.stats
        engine.step = self.checked_step
        start = time.perf_counter()
        try:
            while stats.requests < max_requests and time.perf_counter() - start < seconds:
                size = self.rng.randint(8, 64)
                if stats.rounds % 2 == 0:
                    self.generate_round(size)
                else:
                    self.engine_round(size)
                stats.rounds += 1
                self.after_round()
                if not stats.rss_warm and stats.requests >= warmup_requests:
                    gc.collect()
                    stats.rss_warm = rss_mib()
                    stats.objects_warm = len(gc.get_objects())
                if stats.rss_warm:
                    stats.rss_samples.append(rss_mib())
        finally:
            del engine.step
        stats.seconds = time.perf_counter() - start
        stats.rss_end = rss_mib()
        stats.rss_max = max(stats.rss_samples, default=stats.rss_end)
        gc.collect()
        stats.objects_end = len(gc.get_objects())
        stats.preemptions = engine.get_stats()["num_preemptions"]
        return stats

    def after_round(self) -> None:
        engine = self.engine
        assert not engine.has_unfinished_requests()
        assert not engine.requests and not engine.runner.sampling.seq_generators
        engine.check_integrity()
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)
        assert len(bm.hash_to_block) <= bm.num_blocks


def soak(tiny_model_dir: str, max_requests: int, seconds: float, warmup: int) -> SoakStats:
    llm = LLM(tiny_model_dir, **SOAK_KW)
    stats = Soak(llm, seed=max_requests).run(max_requests, seconds, warmup)
    assert live_sequences() == 0, "Sequence objects outlive their requests"
    return stats


def test_soak_short(tiny_model_dir):
    stats = soak(tiny_model_dir, max_requests=600, seconds=20, warmup=100)
    print(stats.summary("soak (CI)"))
    assert stats.requests >= 100 and stats.aborted > 0 and stats.preemptions > 0
    assert stats.rss_end - stats.rss_warm < 64, "resident memory grew after warm-up"


@pytest.mark.slow
def test_soak_long(tiny_model_dir):
    stats = soak(tiny_model_dir, max_requests=20_000, seconds=240, warmup=2000)
    print(stats.summary("soak (slow)"))
    assert stats.requests >= 3000, "too few requests in the time bound"
    # after warm-up, resident memory stays flat: no growth between the first and the last quarter
    n = len(stats.rss_samples)
    first, last = stats.rss_samples[: max(1, n // 4)], stats.rss_samples[-max(1, n // 4):]
    assert max(last) - max(first) < 16, f"resident memory grew: {max(first):.1f} -> {max(last):.1f} MiB"
    assert stats.objects_end - stats.objects_warm < 2000, "Python objects accumulate"
