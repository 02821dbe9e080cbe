"""Helpers that drive an engine step by step, checking its invariants after every step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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
# PROMPTS and three more that share PROMPTS[5] as a long prefix (prefix-cache hits).
SHARED_PREFIX_PROMPTS = PROMPTS + [PROMPTS[5] + " " + w for w in ("red", "green blue", "and then a dog")]


@dataclass
class RunStats:
    """What the scheduler counted over one run_checked call (max_batch: over the engine's life)."""

    steps: int = 0  # batches scheduled
    mixed_steps: int = 0  # batches with both a decode and a prefill chunk
    chunked_steps: int = 0  # batches where some prefill chunk did not reach the end of its tokens
    max_batch: int = 0


def run_checked(llm: LLM, prompts, params: SamplingParams | list[SamplingParams],
                stats: RunStats | None = None) -> list[RequestOutput]:
    """Like llm.generate, but checks block-manager integrity after every step and that
    no block is held once all requests are done."""
    engine = llm.engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    results = {}
    before = engine.get_stats()
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
        engine.check_integrity()
    after = engine.get_stats()
    if stats is not None:
        stats.steps += after["num_batches"] - before["num_batches"]
        stats.mixed_steps += after["num_mixed_batches"] - before["num_mixed_batches"]
        stats.chunked_steps += after["num_chunked_batches"] - before["num_chunked_batches"]
        stats.max_batch = max(stats.max_batch, after["max_batch_seqs"])
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked after all requests finished"
    assert all(c == 0 for c in bm.ref_counts)
    return [results[i] for i in ids]


@contextlib.contextmanager
def in_process_server(model_dir: str, max_model_len: int = 256, **app_kw):
    """The OpenAI app over a tiny engine (neutral sampling defaults), as a FastAPI TestClient."""
    from fastapi.testclient import TestClient

    from myvllm.entrypoints.api_server import build_app
    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(model_dir, generation_config="vllm", kvcache_block_size=16,
                                             max_model_len=max_model_len, **SMALL_KV)
    with TestClient(build_app(engine, "tiny", **app_kw)) as client:
        yield client
