"""compilation_level=1: the model's forward through torch.compile (Inductor on CPU) gives the
same greedy tokens as transformers and as the eager engine, through prefill, chunks, prefix hits,
mixed steps and multi-pass decode; attention stays an opaque op; arguments are validated.

One compiled engine serves the module (compiling takes a while on a CPU).
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, RunStats, run_checked
from tiny_model import hf_greedy

from myvllm import LLM, SamplingParams
from myvllm.config import EngineConfig

NUM_TOKENS = 12
# Chunked prefill, mixed steps and multi-pass decode in one run; prefix hits on the second.
ENGINE_ARGS = dict(kvcache_block_size=16, max_num_batched_tokens=48, max_num_seqs=6, **SMALL_KV)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(hf_tiny, prompt_ids):
    return [hf_greedy(hf_tiny, p, NUM_TOKENS)[0] for p in prompt_ids]


@pytest.fixture(scope="module")
def eager_outputs(tiny_model_dir, prompt_ids, one_thread):
    llm = LLM(tiny_model_dir, **ENGINE_ARGS)
    first = run_checked(llm, prompt_ids, GREEDY)
    second = run_checked(llm, prompt_ids, GREEDY)
    llm.shutdown()
    return first, second


@pytest.fixture(scope="module")
def compiled_llm(tiny_model_dir, one_thread):
    torch._dynamo.reset()
    llm = LLM(tiny_model_dir, compilation_level=1, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def compiled_run(compiled_llm, prompt_ids):
    """Outputs of the compiled engine over the prompts twice (the second run hits the prefix
    cache), what the scheduler did, and how many graphs Dynamo compiled."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    stats = RunStats()
    first = run_checked(compiled_llm, prompt_ids, GREEDY, stats)
    second = run_checked(compiled_llm, prompt_ids, GREEDY, stats)
    return dict(first=first, second=second, stats=stats, hits=compiled_llm.engine.block_manager.num_hits,
                compiled=type(compiled_llm.engine.runner.model_forward).__name__,
                graphs=counters["stats"]["unique_graphs"] - graphs_before)


def test_compiled_engine_matches_transformers(compiled_run, expected):
    assert compiled_run["compiled"] == "CompiledForward"
    stats = compiled_run["stats"]
    assert stats.chunked_steps > 0 and stats.mixed_steps > 0 and compiled_run["hits"] > 0
    for run in ("first", "second"):
        for i, (out, ref) in enumerate(zip(compiled_run[run], expected)):
            assert out.outputs[0].token_ids == ref, f"{run} run, prompt {i}"


def test_compiled_logprobs_close_to_eager(compiled_run, eager_outputs):
    for compiled, eager in zip(compiled_run["first"] + compiled_run["second"], eager_outputs[0] + eager_outputs[1]):
        assert compiled.outputs[0].token_ids == eager.outputs[0].token_ids
        for step_c, step_e in zip(compiled.outputs[0].logprobs, eager.outputs[0].logprobs):
            assert step_c.keys() == step_e.keys()
            for tid in step_c:
                assert abs(step_c[tid].logprob - step_e[tid].logprob) < 1e-4


def test_steps_of_any_size_share_two_graphs(compiled_run):
    """Prefill chunks, mixed steps and decodes of 1..6 sequences over block tables of any width
    compile two graphs (one token; more), not one per size. Every attention call is an opaque
    op: fullgraph=True would have raised on the reference attention's host loop."""
    assert 1 <= compiled_run["graphs"] <= 2


def test_compiled_forward_of_the_model_equals_eager(compiled_llm, compiled_run):
    """The compiled forward itself on one prefill batch: the hidden states of the eager model."""
    runner = compiled_llm.engine.runner
    inputs = runner._dummy_inputs([5, 3], [5, 3], decode=False)
    inputs.input_ids[:] = range(3, 11)
    inputs.slot_mapping[:] = [16, 17, 18, 19, 20, 32, 33, 34]  # blocks 1 and 2 (free: the runs are done)
    inputs.block_tables[:] = [[1], [2]]
    with torch.inference_mode():
        ids, pos, meta = inputs.to_device(runner.device)
        runner.backend.prepare(meta)
        eager = runner.model(ids, pos, meta)
        compiled = runner.model_forward(ids, pos, meta)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compilation_level_is_validated():
    with pytest.raises(ValueError, match="compilation_level=2"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", compilation_level=2)
    with pytest.raises(TypeError, match="compilation_level"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", compilation_level="1")
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", compilation_level=1, tensor_parallel_size=2)
    assert EngineConfig(model="dummy:qwen3-0.6b", device="cpu", compilation_level=1).compiles
    assert not EngineConfig(model="dummy:qwen3-0.6b", device="cpu", compilation_level=1, enforce_eager=True).compiles
    assert not EngineConfig(model="dummy:qwen3-0.6b", device="cpu").compiles


def test_fake_cuda_ops_give_the_reference_shapes():
    """The fakes torch.compile traces the CUDA ops with return what the torch references return."""
    from myvllm.kernels import reference
    from myvllm.kernels.cuda import fake

    x, res, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    gate_up = torch.randn(24, 16)
    q, k, pos, cos_sin = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.arange(3), torch.randn(8, 8)
    pairs = [
        (fake.FAKES["rms_norm"](x, w, 1e-6), reference.rms_norm(x, w, 1e-6)),
        (fake.FAKES["fused_add_rms_norm"](x, res, w, 1e-6), reference.fused_add_rms_norm(x, res, w, 1e-6)),
        (fake.FAKES["qk_norm_rope"](q, k, w[:8], w[:8], 1e-6, pos, cos_sin),
         reference.qk_norm_rope(q, k, w[:8], w[:8], 1e-6, pos, cos_sin)),
        (fake.FAKES["silu_and_mul"](gate_up), reference.silu_and_mul(gate_up)),
        (fake.FAKES["gemv"](x, gate_up, w, 1e-6, True), reference.norm_linear(x, w, 1e-6, gate_up, True)),
        (fake.FAKES["gemv"](x, gate_up, None, 0.0, False), x @ gate_up.T),
        (fake.FAKES["add_norm_gemv"](x, res, gate_up, w, 1e-6, False),
         reference.add_norm_linear(x, res, w, 1e-6, gate_up, False)),
    ]
    for got, want in pairs:
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert [(t.shape, t.dtype, t.is_contiguous()) for t in got] == [(t.shape, t.dtype, True) for t in want]


# ---- the compiled forward through the fused CUDA ops' schemas, on CPU ----------------------

# bindings.cpp's schemas of torch.ops.myvllm; here the torch references implement them on CPU.
MYVLLM_SCHEMAS = {
    "rms_norm": "(Tensor x, Tensor weight, float eps) -> Tensor",
    "fused_add_rms_norm": "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    "qk_norm_rope": "(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, Tensor positions, "
                    "Tensor cos_sin_cache) -> (Tensor, Tensor)",
    "qk_norm_rope_store": "(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, float eps, "
                          "Tensor positions, Tensor cos_sin_cache, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                          "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) -> (Tensor, Tensor)",
    "silu_and_mul": "(Tensor x) -> Tensor",
    "gemv": "(Tensor x, Tensor weight, Tensor? norm_weight, float eps, bool silu) -> Tensor",
    "add_norm_gemv": "(Tensor x, Tensor residual, Tensor weight, Tensor norm_weight, float eps, bool silu) "
                     "-> (Tensor, Tensor)",
}


@pytest.fixture
def cpu_myvllm_ops():
    """torch.ops.myvllm with the CUDA kernels' schemas and fake versions, run by the torch
    references on CPU; yields the names of the ops called."""
    from myvllm.kernels import reference
    from myvllm.kernels.cuda import fake

    def gemv(x, w, norm_weight, eps, silu):
        return x @ w.T if norm_weight is None else reference.norm_linear(x, norm_weight, eps, w, silu)

    impls = dict(rms_norm=reference.rms_norm, fused_add_rms_norm=reference.fused_add_rms_norm,
                 qk_norm_rope=reference.qk_norm_rope, silu_and_mul=reference.silu_and_mul, gemv=gemv,
                 qk_norm_rope_store=lambda *a: tuple(t.clone() for t in reference.qk_norm_rope_store(*a)),
                 add_norm_gemv=lambda x, r, w, nw, eps, silu: reference.add_norm_linear(x, r, nw, eps, w, silu))
    calls = []

    def recorded(name):
        def run(*args):
            calls.append(name)
            return impls[name](*args)
        return run

    lib = torch.library.Library("myvllm", "DEF")
    for name, schema in MYVLLM_SCHEMAS.items():
        lib.define(name + schema)
        lib.impl(name, recorded(name), "CPU")
    fake.register()
    yield calls
    lib._destroy()


def _fused_step(model, cache, q_lens: list[int], seq_lens: list[int], decode: bool):
    """Inputs of one step; sequence b owns blocks 2b and 2b + 1 (16 tokens each) of cache."""
    from myvllm.attention.backend import AttentionMetadata
    from myvllm.runtime.compilation import mark_kv_cache_static

    mark_kv_cache_static(cache)
    for i, attn in enumerate(model.attention_layers()):
        attn.bind_kv_cache(cache, i)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, seq_lens)])
    owner = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    meta = AttentionMetadata(
        slot_mapping=owner * 32 + positions, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([[2 * b, 2 * b + 1] for b in range(len(q_lens))], dtype=torch.int32),
        query_start_loc=qsl, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        logits_indices=qsl[1:].long() - 1, is_decode_only=decode)
    return positions, meta


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real torch.ops.myvllm library owns the namespace")
def test_compiled_forward_through_the_fused_op_schemas(cpu_myvllm_ops, one_thread):
    """With the fused ops in the model (norm prologues, matrix-vector kernel for one or two
    tokens, q/k norm + rotary + KV store), the compiled forward calls the same ops as the eager
    one, as opaque nodes, and leaves the same hidden states and KV cache."""
    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.config import ModelConfig
    from myvllm.kernels.fused_ops import KERNELS, FusedOps
    from myvllm.models.loader import init_dummy_weights
    from myvllm.models.qwen3_opt import Qwen3ForCausalLM
    from myvllm.runtime.compilation import CompiledForward

    ops = FusedOps(False, "cpu")
    ops.uses_cuda_kernels = True  # the CUDA dispatch, over the ops registered above
    ops._kernel = {op: getattr(torch.ops.myvllm, op).default for op in KERNELS}
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                      rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg, 256, TorchAttentionBackend(), ops)
    init_dummy_weights(model, 0)
    assert model.attention_layers()[0].fused_kv_store
    compiled = CompiledForward(model)
    eager_cache, compiled_cache = torch.zeros(2, 2, 2, 8, 16, 2, 64)
    gen = torch.Generator().manual_seed(0)
    steps = [([5, 3], [5, 3], False), ([1, 1], [6, 4], True), ([1], [7], True), ([4, 1, 2], [4, 8, 6], False),
             ([1, 1, 1], [5, 9, 7], True)]
    with torch.inference_mode():
        for q_lens, seq_lens, decode in steps:
            ids = torch.randint(0, 128, (sum(q_lens),), generator=gen)
            positions, meta = _fused_step(model, eager_cache, q_lens, seq_lens, decode)
            cpu_myvllm_ops.clear()
            eager = model(ids, positions, meta)
            eager_ops = set(cpu_myvllm_ops)
            positions, meta = _fused_step(model, compiled_cache, q_lens, seq_lens, decode)
            cpu_myvllm_ops.clear()
            out = compiled(ids, positions, meta)
            assert set(cpu_myvllm_ops) == eager_ops, (q_lens, decode)
            assert ("gemv" in eager_ops) == (sum(q_lens) <= 2)
            for a, b in zip(eager, out):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(eager_cache, compiled_cache)


# ---- CUDA: the compiled forward inside the decode graphs, with and without the fused kernels ----

@pytest.fixture(scope="module", params=["small", "qwen3-0.6b"])
def gpu_checkpoint(request, tmp_path_factory):
    from test_gpu_engine import SHAPES_06B, SHAPES_SMALL, build_qwen3_checkpoint

    shapes = SHAPES_SMALL if request.param == "small" else SHAPES_06B
    path = build_qwen3_checkpoint(str(tmp_path_factory.mktemp(request.param)), shapes, init_std=0.1)
    return request.param, path, shapes


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_kernels", [True, False], ids=["fused-kernels", "inductor-fuses"])
def test_compiled_engine_on_gpu_equals_eager(gpu_checkpoint, cuda_kernels):
    """bf16, CUDA graphs on, chunked prefill: the compiled engine against the eager one."""
    from test_gpu_engine import assert_close_runs, make_prompts, run_engine

    name, path, shapes = gpu_checkpoint
    prompts = make_prompts(shapes["vocab_size"])
    kw = dict(enforce_eager=False, use_cuda_kernels=cuda_kernels, max_num_batched_tokens=512)
    eager, _ = run_engine(path, prompts, **kw)
    compiled, _ = run_engine(path, prompts, compilation_level=1, **kw)
    assert_close_runs(eager, compiled, f"{name} compiled vs eager, cuda_kernels={cuda_kernels}")


@pytest.mark.gpu
def test_compiled_engine_on_gpu_matches_transformers_float32(gpu_checkpoint):
    from test_gpu_engine import MIN_AGREEMENT, NUM_TOKENS, agreement, make_prompts, run_engine
    from tiny_model import hf_greedy, load_hf_model

    name, path, shapes = gpu_checkpoint
    prompts = make_prompts(shapes["vocab_size"])[:12]
    hf = load_hf_model(path, dtype=torch.float32, device="cuda")
    expected = [hf_greedy(hf, p, NUM_TOKENS)[0] for p in prompts]
    del hf
    torch.cuda.empty_cache()
    outs, _ = run_engine(path, prompts, dtype="float32", enforce_eager=False, compilation_level=1)
    rate = agreement(outs, expected)
    print(f"\n[{name} float32 compiled] greedy agreement {rate:.3f}")
    assert rate >= MIN_AGREEMENT

