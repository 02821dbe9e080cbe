"""The block-FP8 Triton kernels on CUDA against the torch reference, over the linear shapes of
Qwen3-0.6B and Qwen3-8B and token counts 1..8192, eager and replayed from a CUDA graph; and the
engine with FP8 weights, graphs against eager.

Bounds: the activation quantization kernel gives the reference's scales, and its fp8 codes agree
with the reference's (a code may differ by one e4m3 step where float32 division rounds otherwise,
in at most 1e-4 of them). The GEMM in bf16 is within REL_TOL (relative Frobenius error) of the
reference's float32 product of the same fp8 operands: bf16 output rounding is 2^-9 relative per
element, the rest is float32 summation order. Against the unquantized bf16 product of the
dequantized weights it is within QUANT_TOL: that is the activations' e4m3 rounding.

Run on a GPU machine: PYTHONPATH=. python3 -m pytest -m gpu -q tests/test_fp8_kernels.py
"""

from __future__ import annotations

import pytest
import torch
from capture_util import capture_outputs

from myvllm.kernels import reference_fp8, triton_fp8_gemm

pytestmark = pytest.mark.gpu

REL_TOL = 4e-3
QUANT_TOL = 0.06
CODE_MISMATCH_FRACTION = 1e-4
MIN_AGREEMENT = 0.9
# (N, K) of the linear layers at tensor_parallel_size=1: qkv_proj, o_proj, gate_up_proj, down_proj
SHAPES = {
    "0.6b": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)],
    "8b": [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)],
}
TOKENS = [1, 7, 64, 256, 1024, 8192]
CASES = [pytest.param(m, n, k, id=f"{model}-n{n}-k{k}-m{m}") for model, shapes in SHAPES.items()
         for n, k in shapes for m in TOKENS]
RAGGED = [(7, 192, 320), (300, 130, 200), (1, 1000, 1000)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def weights(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    return reference_fp8.quantize_weight(w)


def check_codes(q: torch.Tensor, ref: torch.Tensor) -> None:
    a, b = q.float(), ref.float()
    differ = a != b
    assert differ.float().mean().item() <= CODE_MISMATCH_FRACTION
    assert ((a - b).abs() <= b.abs() / 8 + 2.0**-9)[differ].all()  # one e4m3 step at most


@pytest.mark.parametrize("m, n, k", CASES + [pytest.param(*c, id=f"ragged-{c}") for c in RAGGED])
def test_gemm_matches_reference(m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    wq, ws = weights(n, k, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    xq, xs = triton_fp8_gemm.per_token_group_quant(x)
    ref_q, ref_s = reference_fp8.per_token_group_quant(x)
    torch.testing.assert_close(xs, ref_s, rtol=1e-6, atol=0)  # one float32 division each
    check_codes(xq, ref_q)
    out = triton_fp8_gemm.w8a8_block_linear(x, wq, ws, 128, 128)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    ref = reference_fp8.block_fp8_matmul(ref_q, ref_s, wq, ws, 128, 128, torch.float32)
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(out, reference_fp8.dequant_linear(x.float(), wq, ws, 128, 128)) < QUANT_TOL


@pytest.mark.parametrize("m", [1, 7, 64, 256])
def test_gemm_in_a_cuda_graph(m):
    """Replays compute what eager calls compute on the replayed inputs."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    n, k = SHAPES["8b"][0]
    wq, ws = weights(n, k, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    graph, out = capture_outputs(lambda: triton_fp8_gemm.w8a8_block_linear(x, wq, ws, 128, 128))
    for _ in range(3):
        x.copy_(torch.randn(m, k, generator=gen, device="cuda"))
        graph.replay()
        torch.testing.assert_close(out, triton_fp8_gemm.w8a8_block_linear(x, wq, ws, 128, 128), rtol=0, atol=0)


def test_method_uses_the_kernel_on_cuda():
    from myvllm.layers.quantization.config import Fp8Config
    from myvllm.layers.quantization.fp8 import Fp8LinearMethod

    assert Fp8LinearMethod(Fp8Config(), torch.device("cuda"), torch.bfloat16).uses_triton


def test_engine_fp8_graphs_match_eager():
    """Dummy FP8 Qwen3-0.6B: greedy tokens replayed from CUDA graphs equal the eager ones (for
    MIN_AGREEMENT of the prompts: padded graph batches pick other tiles, whose float32 sums may
    break a near-tie of random weights differently)."""
    import gc

    from myvllm import LLM, SamplingParams

    args = dict(load_format="dummy", quantization="fp8", dtype="bfloat16", skip_tokenizer_init=True,
                gpu_memory_utilization=0.5, max_model_len=1024, max_num_seqs=32)
    prompts = [{"prompt_token_ids": [100 + i, 7, 3000 + 5 * i]} for i in range(20)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM("dummy:qwen3-0.6b", enforce_eager=eager, **args)
        assert llm.engine.runner.model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
        tokens[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    agree = sum(a == b for a, b in zip(tokens[True], tokens[False])) / len(prompts)
    assert agree >= MIN_AGREEMENT, (tokens[True], tokens[False])
