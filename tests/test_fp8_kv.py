"""An fp8 (e4m3) KV cache end to end on CPU, float32 model: greedy generation under every
scheduling situation, its error against float32 attention (transformers on the same weights)
bounded, the scales it reads (1.0, the checkpoint's, or measured at start-up), the doubled
block count, and the engine arguments' errors.

The error of an fp8 cache is measured along the fp8 engine's own greedy continuation:
transformers (float32 KV) scores prompt + continuation in one forward, and for every
generated token we compare its logprob under the engine with transformers', and whether it
is transformers' argmax there too. On the random tiny model (flat, chaotic logits) fp8 KV
moves a greedy token's logprob by about 0.07 on average (bf16 KV: about 0.005) and 90% of the
steps pick transformers' argmax; on a model with peaked logits (`peaked_model_dir`) the mean
is about 0.02 and about 98% agree. The bounds below leave room around those figures; a cache
read without its scales, or quantized wrongly, is off by whole units of logprob.
"""

from __future__ import annotations

import os

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, RunStats, run_checked
from safetensors.torch import load_file, save_file

from myvllm import LLM, SamplingParams
from myvllm.attention import selector
from myvllm.attention.selector import choose_backends
from myvllm.config import EngineConfig
from myvllm.runtime import kv_cache

NUM_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
FP8 = dict(kv_cache_dtype="fp8", kvcache_block_size=16)
# Bounds of (mean |logprob difference|, largest difference, share of steps choosing the argmax).
RANDOM_BOUNDS = (0.12, 1.0, 0.8)
PEAKED_BOUNDS = (0.05, 1.0, 0.95)
# On the GPU, the 28-layer 0.6B shapes with std-0.1 random weights compound each layer's error:
# (mean, largest) |logprob difference| of fp8 against bf16 KV. e4m3 rounds 16 times coarser than
# bf16; a cache read wrongly (wrong element type, unscaled, wrong slots) gives differences of
# several nats, as for unrelated distributions.
GPU_BOUNDS = (0.6, 2.5)
# Peaked logits: the tied embedding (hence the LM head) of the random tiny model, scaled up.
PEAKED_EMBEDDING_SCALE = 10.0

pytestmark = pytest.mark.usefixtures("one_thread")


def write_tensors(model_dir: str, update) -> None:
    """Rewrite model.safetensors of a checkpoint directory with update(tensors) applied."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    update(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> str:
    from tiny_model import build_checkpoint

    path = build_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3-peaked")))

    def scale(tensors):
        tensors["model.embed_tokens.weight"] *= PEAKED_EMBEDDING_SCALE

    write_tensors(path, scale)
    return path


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[list[int]]:
    """PROMPTS and two prompts sharing a long prefix with one of them (prefix-cache hits)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok.encode(p) for p in PROMPTS]
    return ids + [ids[5] + tok.encode(" " + w) for w in ("red", "green blue")]


@torch.no_grad()
def fp8_error(hf, prompts: list[list[int]], outputs) -> tuple[float, float, float]:
    """(mean and largest |engine logprob - transformers logprob| of the generated tokens, share of
    generated tokens that are transformers' argmax given the same prefix)."""
    diffs, agree = [], []
    for prompt, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
        rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(-1)  # [N, vocab]
        target = torch.tensor(tokens)
        truth = rows.gather(1, target[:, None])[:, 0]
        ours = torch.tensor([entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, tokens)])
        diffs.append((ours - truth).abs())
        agree.append(rows.argmax(-1) == target)
    diffs, agree = torch.cat(diffs), torch.cat(agree)
    return diffs.mean().item(), diffs.max().item(), agree.float().mean().item()


def check_error(hf, prompts, outputs, bounds) -> None:
    mean, largest, agreement = fp8_error(hf, prompts, outputs)
    assert mean > 1e-3, f"mean logprob difference {mean}: the cache is not fp8"
    assert mean < bounds[0] and largest < bounds[1] and agreement >= bounds[2], (mean, largest, agreement)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, prompt_ids):
    llm = LLM(tiny_model_dir, enable_prefix_caching=False, **FP8, **SMALL_KV)
    assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    return run_checked(llm, prompt_ids, GREEDY)


def test_fp8_error_is_bounded(hf_tiny, prompt_ids, plain_run):
    check_error(hf_tiny, prompt_ids, plain_run, RANDOM_BOUNDS)


def test_prefix_cache_and_chunked_prefill(tiny_model_dir, hf_tiny, prompt_ids, plain_run):
    """Chunks, mixed batches and prefix-cache hits read the fp8 blocks other steps wrote: the
    tokens are those of whole prompts without a cache hit."""
    llm = LLM(tiny_model_dir, max_num_batched_tokens=7, **FP8, **SMALL_KV)
    stats = RunStats()
    first = run_checked(llm, prompt_ids, GREEDY, stats)
    assert stats.chunked_steps > 0 and stats.mixed_steps > 0
    second = run_checked(llm, prompt_ids, GREEDY)
    assert llm.engine.block_manager.num_hits > 0
    assert tokens(first) == tokens(plain_run) and tokens(second) == tokens(plain_run)
    check_error(hf_tiny, prompt_ids, second, RANDOM_BOUNDS)


def test_preemption(tiny_model_dir, prompt_ids, plain_run):
    llm = LLM(tiny_model_dir, max_model_len=128, num_kv_blocks=8, dtype="float32", device="cpu", **FP8)
    assert tokens(run_checked(llm, prompt_ids, GREEDY)) == tokens(plain_run)
    assert llm.engine.get_stats()["num_preemptions"] > 0


def test_peaked_model_agrees_with_float32(peaked_model_dir, prompt_ids):
    from tiny_model import load_hf_model

    llm = LLM(peaked_model_dir, **FP8, **SMALL_KV)
    check_error(load_hf_model(peaked_model_dir), prompt_ids, run_checked(llm, prompt_ids, GREEDY), PEAKED_BOUNDS)


def test_triton_backend_reads_and_writes_fp8(tiny_model_dir, prompt_ids, plain_run):
    """The Triton store, prefill and decode kernels (interpreted on CPU) give the torch backend's tokens."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    llm = LLM(tiny_model_dir, dtype="float32", device=device, attention_backend="triton", cpu_kv_cache_gib=0.01,
              max_num_batched_tokens=13, enforce_eager=True, **FP8)
    assert llm.engine.runner.backend.name == "triton"
    n = 4
    few = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = run_checked(llm, prompt_ids[:n] + prompt_ids[-2:], few)
    assert tokens(outs) == [t[:8] for t in tokens(plain_run[:n] + plain_run[-2:])]


# ------------------------------------------------------------------------------------ scales


def test_checkpoint_scales_are_read(tmp_path, hf_tiny, prompt_ids):
    """vLLM's names: a per-tensor k_scale and a per-head v_scale per layer. Values far from 1
    make a store or a read that ignores them show as a large error."""
    from tiny_model import build_checkpoint

    path = build_checkpoint(str(tmp_path / "scaled"))
    v_scale = torch.tensor([0.5, 2.0])

    def add_scales(tensors):
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(4.0)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = v_scale.clone()

    write_tensors(path, add_scales)
    llm = LLM(path, **FP8, **SMALL_KV)
    for attn in llm.engine.runner.model.attention_layers():
        assert torch.equal(attn.k_scale, torch.full((2,), 4.0)) and torch.equal(attn.v_scale, v_scale)
    check_error(hf_tiny, prompt_ids, run_checked(llm, prompt_ids, GREEDY), RANDOM_BOUNDS)
    # A model-dtype cache loads the same checkpoint and ignores the scales: transformers' tokens exactly.
    exact = run_checked(LLM(path, kvcache_block_size=16, **SMALL_KV), prompt_ids[:3], GREEDY)
    assert fp8_error(hf_tiny, prompt_ids[:3], exact)[1] < 1e-4


def test_bad_checkpoint_scale_names_the_tensor(tmp_path):
    from tiny_model import build_checkpoint

    path = build_checkpoint(str(tmp_path / "bad"))
    write_tensors(path, lambda t: t.update({"model.layers.1.self_attn.k_scale": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_scale.*shape \(3,\)"):
        LLM(path, **FP8, **SMALL_KV)
    write_tensors(path, lambda t: t.update({"model.layers.1.self_attn.k_scale": torch.tensor(-1.0)}))
    with pytest.raises(ValueError, match="positive and finite"):
        LLM(path, **FP8, **SMALL_KV)


def test_calculated_scales(tiny_model_dir, hf_tiny, prompt_ids):
    """calculate_kv_scales: each layer's scales from a calibration forward, one per tensor."""
    llm = LLM(tiny_model_dir, calculate_kv_scales=True, **FP8, **SMALL_KV)
    layers = llm.engine.runner.model.attention_layers()
    for attn in layers:
        for scale in (attn.k_scale, attn.v_scale):
            assert (scale > 0).all() and (scale != 1.0).all() and (scale == scale[0]).all()
    assert layers[0].k_scale[0] != layers[1].k_scale[0]
    check_error(hf_tiny, prompt_ids, run_checked(llm, prompt_ids, GREEDY), RANDOM_BOUNDS)


def test_scales_from_a_calibration_cache():
    cache = torch.zeros(2, 3, 4, 16, 2, 8)  # [2, L, blocks, block_size, Hkv, D]
    cache[0, 0, 1, 3, 1, 5] = -448.0
    cache[1, 0, 2, 0, 0, 0] = 22.4
    cache[0, 1, 0, 0, 0, 0] = 1.0
    scales = kv_cache.kv_scales_from_cache(cache)
    # the largest |value| maps to 448 / KV_SCALE_HEADROOM; a layer that stored only zeros keeps 1.0
    top = 448.0 / kv_cache.KV_SCALE_HEADROOM
    expected = torch.tensor([[448.0 / top, 1.0 / top, 1.0], [22.4 / top, 1.0, 1.0]])
    torch.testing.assert_close(scales, expected)


# ------------------------------------------------------------------------------ memory, args


def test_fp8_doubles_the_blocks(tiny_model_dir):
    bf16_block = 2 * 2 * 16 * 2 * 32 * 2  # K and V, 2 layers, 16 tokens, 2 KV heads, head_dim 32, 2 bytes
    assert kv_cache.block_bytes(2, 16, 2, 32, torch.bfloat16) == bf16_block
    blocks = {}
    for dtype, kv in (("bfloat16", "auto"), ("bfloat16", "fp8"), ("float32", "fp8")):
        llm = LLM(tiny_model_dir, dtype=dtype, device="cpu", cpu_kv_cache_gib=1000 * bf16_block / kv_cache.GIB,
                  kv_cache_dtype=kv, kvcache_block_size=16)
        blocks[dtype, kv] = llm.engine.block_manager.num_blocks
    assert blocks == {("bfloat16", "auto"): 1000, ("bfloat16", "fp8"): 2000, ("float32", "fp8"): 2000}


def test_block_bytes_by_dtype():
    assert kv_cache.block_bytes(28, 256, 8, 128, torch.float8_e4m3fn) * 2 == kv_cache.block_bytes(
        28, 256, 8, 128, torch.bfloat16)


@pytest.mark.parametrize("value", ["fp8_e5m2", "float8", "int8", ""])
def test_bad_kv_cache_dtype_names_the_field(value):
    with pytest.raises(ValueError, match=rf"kv_cache_dtype='{value}' is not supported.*'auto', 'fp8', 'fp8_e4m3'"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", kv_cache_dtype=value)


def test_calculate_kv_scales_needs_fp8():
    with pytest.raises(ValueError, match="calculate_kv_scales=True.*kv_cache_dtype='auto'"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", calculate_kv_scales=True)
    with pytest.raises(TypeError, match="calculate_kv_scales"):
        EngineConfig(model="dummy:qwen3-0.6b", device="cpu", kv_cache_dtype="fp8", calculate_kv_scales=1)


def test_fp8_e4m3_is_fp8(tiny_model_dir):
    llm = LLM(tiny_model_dir, kv_cache_dtype="fp8_e4m3", num_kv_blocks=64, dtype="float32", device="cpu")
    assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn


def test_flash_attn_does_not_read_fp8(monkeypatch):
    # the choice is made from the arguments alone; flash-attn is said to win both phases
    monkeypatch.setattr(selector, "MEASURED_FASTER", {"prefill": "flash_attn", "decode": "flash_attn"})
    with pytest.raises(ValueError, match="attention_backend='flash_attn'.*kv_cache_dtype='fp8'"):
        choose_backends("flash_attn", "cuda", 256, 128, True, kv_cache_dtype="fp8")
    choice = choose_backends("auto", "cuda", 256, 128, True, kv_cache_dtype="fp8_e4m3")
    assert (choice.prefill, choice.decode) == ("triton", "triton") and "kv_cache_dtype='fp8_e4m3'" in choice.reason
    assert choose_backends("auto", "cuda", 256, 128, True).prefill == "flash_attn"  # the bf16 cache would take it
    assert choose_backends("auto", "cpu", 256, 128, True, kv_cache_dtype="fp8").decode == "torch"


def test_fused_store_takes_fp8(caplog):
    """The fused q/k norm + rotary + store op quantizes into an fp8 cache: bound to one, the layers
    keep it where the head_dim suits it; elsewhere its refusal names the head_dim, as for bf16."""
    import logging

    from test_kernel_support import forced_kernels, refusals

    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.kernels import fused_ops
    from myvllm.kernels.cuda import support
    from myvllm.layers.attention import Attention
    from myvllm.layers.rotary import RotaryEmbedding

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    assert support.qk_norm_rope_store(128, (bf16, bf16, fp8, fp8), torch.float32) is None
    assert "mixed dtypes" in support.qk_norm_rope_store(128, (bf16, torch.float16, fp8), torch.float32)
    caplog.set_level(logging.INFO, logger=fused_ops.__name__)
    ops = forced_kernels()
    for head_dim in (128, 32):
        layers = [Attention(4, 2, head_dim, head_dim**-0.5, RotaryEmbedding(head_dim, 64, 1e4),
                            TorchAttentionBackend(), ops, bf16) for _ in range(3)]
        cache = torch.zeros(2, 3, 2, 16, 2, head_dim, dtype=fp8)  # [K/V, layers, blocks, block, Hkv, D]
        for i, a in enumerate(layers):
            a.bind_kv_cache(cache, i)
        assert all(a.fused_kv_store == (head_dim == 128) for a in layers)
    assert refusals(caplog) == ["qk_norm_rope_store: CUDA kernel not used (head_dim 32 not in [64, 128, 256]); "
                                "running the torch reference instead"]


# --------------------------------------------------------------------------------- GPU engine


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    from test_gpu_engine import SHAPES_06B, build_qwen3_checkpoint

    return build_qwen3_checkpoint(str(tmp_path_factory.mktemp("qwen3-0.6b-fp8")), SHAPES_06B, init_std=0.1), SHAPES_06B


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 13, 64, 250])
def test_gpu_fp8_graph_replay_equals_eager(gpu_checkpoint, batch):
    """The Triton backend on an fp8 cache: decode graphs replay what eager steps compute."""
    import random

    from test_gpu_engine import assert_close_runs, run_engine

    path, shapes = gpu_checkpoint
    rng = random.Random(batch)
    prompts = [[rng.randrange(shapes["vocab_size"]) for _ in range(64)] for _ in range(batch)]
    eager, _ = run_engine(path, prompts, max_num_seqs=256, kv_cache_dtype="fp8")
    graphs, _ = run_engine(path, prompts, max_num_seqs=256, enforce_eager=False, kv_cache_dtype="fp8")
    assert_close_runs(eager, graphs, f"fp8 KV: graphs vs eager, batch {batch}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant, kw", [
    ("plain", dict(enable_prefix_caching=False)),
    ("prefix-cache", dict(repeat=2)),
    ("chunked", dict(max_num_batched_tokens=96)),
    ("preemption", dict(num_kv_blocks=80)),
    ("block-256", dict(kvcache_block_size=256)),
])
def test_gpu_fp8_close_to_bf16_kv(gpu_checkpoint, variant, kw):
    """bf16 model, fp8 against bf16 KV on the GPU paths (prefill, chunks, prefix hits, decode
    graphs): the logprobs of the tokens both choose, up to the first divergence, within the
    CPU bounds (loosened twofold for the largest)."""
    from test_gpu_engine import make_prompts, run_engine

    path, shapes = gpu_checkpoint
    prompts = make_prompts(shapes["vocab_size"])
    bf16, _ = run_engine(path, prompts, enforce_eager=False, **kw)
    fp8, stats = run_engine(path, prompts, enforce_eager=False, kv_cache_dtype="fp8", **kw)
    if variant == "prefix-cache":
        assert stats["hits"] > 0
    if variant == "preemption":
        assert stats["preemptions"] > 0
    diffs, same = [], 0
    for a, b in zip(bf16, fp8):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same += ta == tb
        for j, (step_a, step_b) in enumerate(zip(a.outputs[0].logprobs, b.outputs[0].logprobs)):
            if ta[j] != tb[j]:  # the contexts differ from here on
                break
            diffs.append(abs(step_a[ta[j]].logprob - step_b[ta[j]].logprob))
    diffs = torch.tensor(diffs)
    print(f"\n[fp8 vs bf16 KV, {variant}] identical sequences {same}/{len(prompts)}, mean |logprob diff| "
          f"{diffs.mean():.4f}, max {diffs.max():.4f}")
    assert diffs.mean() < GPU_BOUNDS[0] and diffs.max() < GPU_BOUNDS[1]
