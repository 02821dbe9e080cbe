"""One decode step of the Qwen3-0.6B-shaped model (random weights): CUDA graph vs eager,
and the attention kernels alone.

    python -m pytest -m gpu benchmarks/test_bench_decode.py

Each decode step runs the 28 layers and the LM head for B sequences of CONTEXT tokens
(inputs that write nothing to the cache), then synchronises. `extra_info` holds ms/step.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCHES = [1, 64, 256]
CONTEXT = 1024


@pytest.fixture(scope="module")
def engines():
    from myvllm import LLM

    made = {}
    for mode, eager in (("graph", False), ("eager", True)):
        # the dummy inputs write nothing and read block 0 only: a small pool lets both engines fit
        made[mode] = LLM("dummy:qwen3-0.6b", load_format="dummy", skip_tokenizer_init=True, enforce_eager=eager,
                         max_num_seqs=256, num_kv_blocks=16)
    yield made
    made.clear()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_decode_step(benchmark, engines, mode, batch):
    runner = engines[mode].engine.runner
    inputs = runner._dummy_inputs([1] * batch, [CONTEXT] * batch, decode=True)
    benchmark.group = f"decode step B={batch}"

    def step():
        if mode == "graph":
            runner.graph_runner.run(inputs, batch)
        else:
            runner._forward_eager(inputs)
        torch.cuda.synchronize()

    with torch.inference_mode():
        step()
        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
    benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3


@pytest.mark.parametrize("kernel", ["decode-256x1024", "prefill-16x1024"])
def test_attention_kernel(benchmark, kernel):
    from myvllm.kernels.triton_decode_attention import allocate_decode_workspace, decode_attention
    from myvllm.kernels.triton_prefill_attention import prefill_attention

    h, hkv, d, bs = 16, 8, 128, 256
    if kernel.startswith("decode"):
        b, ctx = 256, 1024
    else:
        b, ctx = 16, 1024
    nblocks = b * ctx // bs
    k = torch.randn(nblocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(nblocks, device="cuda").to(torch.int32).view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    benchmark.group = "attention kernels"
    if kernel.startswith("decode"):
        q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        po, pl = allocate_decode_workspace(b, h, d, 1, "cuda")

        def run():
            decode_attention(q, k, v, out, lens, tables, d**-0.5, po, pl, 1)
            torch.cuda.synchronize()
    else:
        q = torch.randn(b * ctx, h, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32) * ctx

        def run():
            prefill_attention(q, k, v, out, qsl, lens, tables, ctx, d**-0.5)
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    benchmark.extra_info["ms"] = benchmark.stats.stats.median * 1e3
