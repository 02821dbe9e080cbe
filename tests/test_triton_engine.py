"""The whole engine with the Triton attention backend (run by Triton's interpreter on CPU)
matches transformers greedily: prefill, chunked prefill, mixed and decode-only steps."""

from __future__ import annotations

import os

import pytest
import torch
from engine_utils import PROMPTS, RunStats, run_checked
from tiny_model import hf_greedy

from myvllm import LLM, SamplingParams

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs CUDA or Triton's interpreter")


def test_triton_backend_matches_transformers(tiny_model_dir, hf_tiny):
    pytest.importorskip("triton")
    device = "cpu" if INTERPRETED else "cuda"
    llm = LLM(tiny_model_dir, dtype="float32", device=device, kvcache_block_size=16, attention_backend="triton",
              cpu_kv_cache_gib=0.01, max_num_batched_tokens=13, enforce_eager=True)
    assert llm.engine.runner.backend.name == "triton"
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:6]]
    stats = RunStats()
    outs = run_checked(llm, prompts + prompts[-2:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       stats)
    assert stats.mixed_steps > 0 and stats.chunked_steps > 0
    assert llm.engine.block_manager.num_hits > 0
    for prompt, out in zip(prompts + prompts[-2:], outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_tiny, prompt, 8)[0]
