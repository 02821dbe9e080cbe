"""The engine on attention_backend="flash_attn" (and flash-attn for prefill only, with Triton
decoding) against transformers and against the Triton backend, in bf16 on CUDA: prefill varlen
with prefix hits and chunks, flash_attn_with_kvcache decode through the block table, eager and
inside CUDA graphs, compiled and not. Skipped where flash_attn is not importable.

    PYTHONPATH=$PWD/.fa2:$PWD python3 -m pytest -m gpu -q tests/test_flash_attn_gpu.py
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_gpu_engine import (
    NEAR_TIE,
    assert_close_runs,
    build_qwen3_checkpoint,
    divergence_gaps,
    hf_references,
    run_engine,
)

pytestmark = pytest.mark.gpu

# flash-attn's paged KV needs a block size that is a multiple of 256; its build here has head_dim 128.
FLASH_ARGS = dict(kvcache_block_size=256)
# Two bf16 kernels summing in different orders flip near ties (the small model has many): on the
# H200 23 of 32 greedy runs were identical, each divergence a near tie. The near-tie and logprob
# checks of assert_close_runs are what catch a defect; this only bounds how often ties flip.
MIN_SAME = 0.6
SHAPES_SMALL_128 = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False)
SHAPES_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)

VARIANTS = [
    ("plain", dict(enable_prefix_caching=False)),
    ("prefix-cache", dict(enable_prefix_caching=True, repeat=2)),
    ("chunked", dict(max_num_batched_tokens=96)),
    ("graphs", dict(enforce_eager=False)),
    ("graphs-compiled", dict(enforce_eager=False, compilation_level=1)),
]


@pytest.fixture(scope="module", autouse=True)
def needs_flash_attn():
    pytest.importorskip("flash_attn")


@pytest.fixture(scope="module", params=["small-hd128", "qwen3-0.6b"])
def checkpoint(request, tmp_path_factory, needs_flash_attn):
    shapes = SHAPES_SMALL_128 if request.param == "small-hd128" else SHAPES_06B
    path = build_qwen3_checkpoint(str(tmp_path_factory.mktemp(request.param)), shapes, init_std=0.1)
    return request.param, path, shapes


@pytest.fixture(scope="module")
def hf_reference(checkpoint):
    _, path, shapes = checkpoint
    return hf_references(path, shapes)


def logprob_error(outs, refs) -> tuple[float, float]:
    """Mean |first-position logprob - float32 truth| of ours and of transformers' bf16."""
    ours, theirs = [], []
    for out, (_, bf16_logits), (_, fp32_logits) in zip(outs, refs[torch.bfloat16], refs[torch.float32]):
        truth = torch.log_softmax(fp32_logits[0].double(), -1)
        hf_bf16 = torch.log_softmax(bf16_logits[0].double(), -1)
        for tid, lp in out.outputs[0].logprobs[0].items():
            ours.append(abs(lp.logprob - truth[tid].item()))
            theirs.append(abs(hf_bf16[tid].item() - truth[tid].item()))
    return sum(ours) / len(ours), sum(theirs) / len(theirs)


@pytest.mark.parametrize("variant, kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_flash_attn_matches_transformers_and_triton(checkpoint, hf_reference, variant, kw):
    name, path, _ = checkpoint
    prompts, refs = hf_reference
    kw = {**FLASH_ARGS, **kw}
    flash, stats = run_engine(path, prompts, attention_backend="flash_attn", **kw)
    triton, _ = run_engine(path, prompts, attention_backend="triton", **kw)
    if variant == "prefix-cache":
        assert stats["hits"] > 0
    gaps = divergence_gaps(flash, refs[torch.bfloat16])
    ours, theirs = logprob_error(flash, refs)
    triton_err, _ = logprob_error(triton, refs)
    print(f"\n[{name} {variant}] flash_attn divergence gaps {[round(g, 3) for g in gaps]}; first-position logprob "
          f"error vs float32: flash_attn {ours:.4f}, triton {triton_err:.4f}, transformers bf16 {theirs:.4f}; {stats}")
    assert all(g < NEAR_TIE for g in gaps), "a greedy divergence from transformers that is not a near tie"
    assert ours <= 1.5 * theirs + 0.01
    assert_close_runs(triton, flash, f"{name} {variant}: triton vs flash_attn", min_same=MIN_SAME)


@pytest.mark.parametrize("eager", [True, False])
def test_flash_attn_prefill_with_triton_decode(checkpoint, hf_reference, monkeypatch, eager):
    """auto with flash-attn the prefill winner: one engine, two backends over one cache."""
    from myvllm import LLM
    from myvllm.attention import selector

    _, path, _ = checkpoint
    prompts, refs = hf_reference
    monkeypatch.setattr(selector, "MEASURED_FASTER", {"prefill": "flash_attn", "decode": "triton"})
    llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.5, max_model_len=1024,
              max_num_seqs=64, enforce_eager=eager, **FLASH_ARGS)
    assert llm.engine.runner.backend.name == "flash_attn (prefill) + triton (decode)"
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    phases, _ = run_engine(path, prompts, enforce_eager=eager, **FLASH_ARGS)
    triton, _ = run_engine(path, prompts, attention_backend="triton", enforce_eager=eager, **FLASH_ARGS)
    assert all(g < NEAR_TIE for g in divergence_gaps(phases, refs[torch.bfloat16]))
    assert_close_runs(triton, phases, "triton vs flash_attn prefill + triton decode", min_same=MIN_SAME)
