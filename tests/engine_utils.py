"""Helpers that drive an engine step by step, checking its invariants after every step."""

from __future__ import annotations

from dataclasses import dataclass, field

from myvllm import LLM, SamplingParams
from myvllm.outputs import RequestOutput

SMALL_KV = dict(dtype="float32", device="cpu", cpu_kv_cache_gib=0.05)

PROMPTS = [
    "the",
    "the quick brown fox",
    "numbers like one two three four five and colours red green blue while seven wizards",
    "people talk about weather food music and",
    "a lazy dog",
    "in old towns near rivers and mountains where people talk about weather food music numbers like one "
    "two three four five and colours red green blue the quick brown fox jumps over a lazy dog",
    "seven wizards quietly judge boxing matches",
    "blue",
    "mountains where people talk",
    "one two three four five six seven eight nine ten eleven twelve thirteen",
]


@dataclass
class RunStats:
    steps: int = 0
    mixed_steps: int = 0  # steps with both a decode and a prefill chunk
    chunked_steps: int = 0  # steps where some prefill chunk did not reach the end of its tokens
    max_batch: int = 0
    batches: list = field(default_factory=list)


def run_checked(llm: LLM, prompts, params: SamplingParams | list[SamplingParams],
                stats: RunStats | None = None) -> list[RequestOutput]:
    """Like llm.generate, but checks block-manager integrity after every step and that
    no block is held once all requests are done."""
    engine = llm.engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    results = {}
    stats = stats if stats is not None else RunStats()
    sched = engine.scheduler
    original = sched.schedule

    def recording_schedule():
        b = original()
        if b is not None:
            stats.steps += 1
            stats.max_batch = max(stats.max_batch, len(b.seqs))
            decode = [c + 1 == len(s) and n == 1 for s, n, c in zip(b.seqs, b.num_new_tokens, b.num_computed_tokens)]
            if any(decode) and not all(decode):
                stats.mixed_steps += 1
            if not all(b.samples(i) for i in range(len(b.seqs))):
                stats.chunked_steps += 1
        return b

    sched.schedule = recording_schedule
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                results[out.request_id] = out
            engine.check_integrity()
    finally:
        sched.schedule = original
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked after all requests finished"
    assert all(c == 0 for c in bm.ref_counts)
    return [results[i] for i in ids]
