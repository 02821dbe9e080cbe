"""Qwen3MoeForCausalLM: greedy outputs equal transformers' token for token (float32, CPU) under
prefix caching, chunked prefill and preemption; TP=2 equals TP=1; the per-expert checkpoint
tensors fill the stacked expert weights, and broken checkpoints fail naming the tensor."""

from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch
from engine_utils import PROMPTS, SHARED_PREFIX_PROMPTS, SMALL_KV, RunStats, run_checked
from safetensors.torch import load_file, save_file
from tiny_model import build_tokenizer, greedy_reference

from myvllm import LLM, SamplingParams
from myvllm.config import BUILTIN_SHAPES, SUPPORTED_ARCHITECTURES, ModelConfig

NUM_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
NUM_EXPERTS, TOP_K = 8, 2


def build_moe_checkpoint(path: str, *, norm_topk_prob: bool = True, num_layers: int = 3,
                         mlp_only_layers: tuple[int, ...] = (1,), decoder_sparse_step: int = 1,
                         num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, seed: int = 0, **shapes) -> str:
    """A random Qwen3-MoE checkpoint (8 experts, top-2, layer 1 dense by default) with its tokenizer;
    shapes: Qwen3MoeConfig fields replacing the tiny defaults (hidden_size=64, ...)."""
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dims = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32) | shapes
    config = Qwen3MoeConfig(
        vocab_size=512, num_hidden_layers=num_layers, **dims, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(mlp_only_layers),
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, initializer_range=0.2, architectures=["Qwen3MoeForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float()
    with torch.no_grad():  # norms away from 1 so that every norm is really exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos, bos]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_hf_moe(path: str):
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "raw_topk"])
def moe_dir(request, tmp_path_factory) -> str:
    return build_moe_checkpoint(str(tmp_path_factory.mktemp("tiny-moe")), norm_topk_prob=request.param)


@pytest.fixture(scope="module")
def moe_reference(moe_dir, one_thread):
    """HF greedy continuations of PROMPTS and of prompts sharing long prefixes."""
    return greedy_reference(moe_dir, load_hf_moe(moe_dir), SHARED_PREFIX_PROMPTS, NUM_TOKENS)


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory, one_thread):
    """The routing of the published models (128 experts, top-8, renormalised) on every second
    layer (decoder_sparse_step 2), and HF greedy continuations of PROMPTS."""
    path = build_moe_checkpoint(str(tmp_path_factory.mktemp("wide-moe")), num_layers=4, mlp_only_layers=(),
                                decoder_sparse_step=2, num_experts=128, top_k=8)
    return path, *greedy_reference(path, load_hf_moe(path), PROMPTS, NUM_TOKENS)


def check_equal(outputs, expected):
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}: {out.outputs[0].token_ids} != {ref}"


# ---- config --------------------------------------------------------------------------------------

def test_config_reads_the_moe_fields(moe_dir):
    from transformers import AutoConfig

    cfg, hf = ModelConfig.from_hf(moe_dir), AutoConfig.from_pretrained(moe_dir)
    assert cfg.architecture == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob,
            cfg.decoder_sparse_step, cfg.mlp_only_layers) == (
        hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.norm_topk_prob,
        hf.decoder_sparse_step, tuple(hf.mlp_only_layers))


@pytest.mark.parametrize("mlp_only_layers, step", [((), 1), ((0, 3), 1), ((), 2), ((2,), 3)])
def test_sparse_layers_are_those_of_transformers(mlp_only_layers, step):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock

    hf = Qwen3MoeConfig(hidden_size=16, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=6,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                        num_experts_per_tok=2, mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=step,
                        architectures=["Qwen3MoeForCausalLM"], vocab_size=32)
    cfg = ModelConfig.from_hf_config(hf)
    expected = [isinstance(Qwen3MoeDecoderLayer(hf, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(6)]
    assert [cfg.is_sparse_layer(i) for i in range(6)] == expected


def test_builtin_moe_shapes():
    a3b = ModelConfig.builtin("qwen3-30b-a3b")
    assert (a3b.hidden_size, a3b.num_hidden_layers, a3b.num_attention_heads, a3b.num_key_value_heads,
            a3b.head_dim, a3b.num_experts, a3b.num_experts_per_tok, a3b.moe_intermediate_size,
            a3b.vocab_size, a3b.norm_topk_prob, a3b.tie_word_embeddings) == (
        2048, 48, 32, 4, 128, 128, 8, 768, 151936, True, False)
    a22b = ModelConfig.builtin("dummy:qwen3-235b-a22b")
    assert (a22b.hidden_size, a22b.num_hidden_layers, a22b.num_attention_heads, a22b.moe_intermediate_size) == (
        4096, 94, 64, 1536)
    assert all(a.is_sparse_layer(i) for a in (a3b, a22b) for i in range(a.num_hidden_layers))
    assert a3b.architecture == a22b.architecture == "Qwen3MoeForCausalLM"
    assert {c.get("architecture", "Qwen3ForCausalLM") for c in BUILTIN_SHAPES.values()} == set(SUPPORTED_ARCHITECTURES)


# config.json of the published checkpoints (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B), the fields we read
PUBLISHED_COMMON = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=128,
                        num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, rope_theta=1000000.0,
                        rms_norm_eps=1e-06, max_position_embeddings=40960, tie_word_embeddings=False,
                        torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
PUBLISHED = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32),
    "qwen3-235b-a22b": dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_shapes_equal_the_published_config(name, tmp_path):
    import json

    with open(tmp_path / "config.json", "w") as f:
        json.dump({**PUBLISHED_COMMON, **PUBLISHED[name]}, f)
    assert ModelConfig.builtin(name) == ModelConfig.from_hf(str(tmp_path))


def test_registry_runs_every_supported_architecture():
    from myvllm.models.registry import MODELS, model_class

    assert set(MODELS) == set(SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        model_class("LlamaForCausalLM")


@pytest.mark.parametrize("field, value, match", [
    ("num_experts_per_tok", 9, r"num_experts_per_tok=9 .*\[1, 8\]"),
    ("moe_intermediate_size", 0, "moe_intermediate_size=0"),
    ("decoder_sparse_step", 0, "decoder_sparse_step=0"),
    ("mlp_only_layers", (0, 7), r"mlp_only_layers=\[0, 7\].*\[7\].*\[0, 2\]"),
])
def test_bad_moe_fields_are_refused(moe_dir, field, value, match):
    import dataclasses

    cfg = ModelConfig.from_hf(moe_dir)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(cfg, **{field: value})


def test_tensor_parallel_needs_the_expert_size_to_split():
    cfg = ModelConfig.builtin("qwen3-30b-a3b")
    cfg.check_tensor_parallel(4)  # 768 / 4
    import dataclasses

    odd = dataclasses.replace(cfg, moe_intermediate_size=770)
    with pytest.raises(ValueError, match="moe_intermediate_size=770"):
        odd.check_tensor_parallel(4)


# ---- the ops against transformers' ---------------------------------------------------------------

@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_block_equals_transformers(renormalize):
    """The router and the experts' reference, on transformers' own sparse block's weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from myvllm.kernels import reference_moe

    hf_cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                            norm_topk_prob=renormalize, initializer_range=0.3)
    torch.manual_seed(3)
    block = Qwen3MoeSparseMoeBlock(hf_cfg).float()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 21, 32)
    with torch.no_grad():
        expected = block(x)[0]
        weights, ids = reference_moe.topk_softmax(x[0] @ block.gate.weight.T, 3, renormalize)
        out = reference_moe.fused_experts(x[0], block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    if renormalize:
        assert torch.allclose(weights.sum(-1), torch.ones(21))


# ---- the engine against transformers -------------------------------------------------------------

def test_greedy_matches_transformers_with_prefix_caching(moe_dir, moe_reference):
    ids, expected = moe_reference
    llm = LLM(moe_dir, kvcache_block_size=16, **SMALL_KV)
    model = llm.engine.runner.model
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert type(model.model.layers[1].mlp).__name__ == "Qwen3MLP"  # mlp_only_layers
    check_equal(run_checked(llm, ids, GREEDY), expected)
    check_equal(run_checked(llm, ids, GREEDY), expected)  # now from the prefix cache
    assert llm.engine.block_manager.num_hits > 0


def test_wide_routing_matches_transformers(wide_moe):
    path, ids, expected = wide_moe
    llm = LLM(path, kvcache_block_size=16, max_num_batched_tokens=16, **SMALL_KV)
    layers = llm.engine.runner.model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["Qwen3MLP", "Qwen3MoeSparseBlock"] * 2
    check_equal(run_checked(llm, ids, GREEDY), expected)


def test_chunked_prefill_and_mixed_batches(moe_dir, moe_reference):
    ids, expected = moe_reference
    llm = LLM(moe_dir, kvcache_block_size=16, max_num_batched_tokens=7, enable_prefix_caching=False, **SMALL_KV)
    stats = RunStats()
    check_equal(run_checked(llm, ids, GREEDY, stats), expected)
    assert stats.chunked_steps > 0 and stats.mixed_steps > 0


def test_preemption_by_recompute(moe_dir, moe_reference):
    ids, expected = moe_reference
    llm = LLM(moe_dir, kvcache_block_size=16, max_model_len=128, num_kv_blocks=8, dtype="float32", device="cpu")
    check_equal(run_checked(llm, ids, GREEDY), expected)
    assert llm.engine.get_stats()["num_preemptions"] > 0, "the tiny pool forced no preemption"


def test_tp2_matches_tp1(moe_dir, moe_reference):
    ids, expected = moe_reference
    prompts = ids[:6]
    cpu = dict(dtype="float32", device="cpu", cpu_kv_cache_gib=0.05, kvcache_block_size=16,
               max_num_batched_tokens=32)
    outs = {}
    for tp in (1, 2):
        llm = LLM(moe_dir, tensor_parallel_size=tp, **cpu)
        if tp == 2:
            experts = llm.engine.runner.model.model.layers[0].mlp.experts
            assert experts.w13_weight.shape == (NUM_EXPERTS, 32, 64)  # half of 2 x 32 rows
        outs[tp] = [o.outputs[0].token_ids for o in run_checked(llm, prompts, GREEDY)]
        llm.shutdown()
    assert outs[2] == outs[1] == expected[:6]


def test_each_rank_holds_its_slice_of_every_expert(moe_dir):
    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.distributed.parallel_state import TensorParallelGroup
    from myvllm.kernels.fused_ops import FusedOps
    from myvllm.models.loader import load_checkpoint
    from myvllm.models.qwen3_moe import Qwen3MoeForCausalLM

    cfg = ModelConfig.from_hf(moe_dir)
    full = load_file(os.path.join(moe_dir, "model.safetensors"))
    size = cfg.moe_intermediate_size // 2
    for rank in (0, 1):
        model = Qwen3MoeForCausalLM(cfg, 64, TorchAttentionBackend(), FusedOps(False, "cpu"),
                                    TensorParallelGroup(rank, 2))
        load_checkpoint(model, moe_dir, cfg.tie_word_embeddings)
        p = dict(model.named_parameters())
        for layer in (0, 2):
            mlp = f"model.layers.{layer}.mlp."
            assert torch.equal(p[mlp + "gate.weight"], full[mlp + "gate.weight"])  # the router: replicated
            for e in range(NUM_EXPERTS):
                ckpt = f"{mlp}experts.{e}."
                gate = full[ckpt + "gate_proj.weight"][rank * size:(rank + 1) * size]
                up = full[ckpt + "up_proj.weight"][rank * size:(rank + 1) * size]
                down = full[ckpt + "down_proj.weight"][:, rank * size:(rank + 1) * size]
                assert torch.equal(p[mlp + "experts.w13_weight"][e], torch.cat([gate, up]))
                assert torch.equal(p[mlp + "experts.w2_weight"][e], down)


def test_dummy_weights_with_a_moe_config(moe_dir):
    llm = LLM(moe_dir, load_format="dummy", **SMALL_KV)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert experts.w13_weight.std() > 0.01 and experts.w2_weight.std() > 0.01


# ---- broken checkpoints --------------------------------------------------------------------------

def _edited_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def test_missing_expert_tensor_is_named(moe_dir, tmp_path):
    path = _edited_copy(moe_dir, tmp_path / "m", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks.*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        LLM(path, **SMALL_KV)


def test_missing_router_is_named(moe_dir, tmp_path):
    path = _edited_copy(moe_dir, tmp_path / "m", lambda t: t.pop("model.layers.0.mlp.gate.weight"))
    with pytest.raises(ValueError, match=r"lacks.*model\.layers\.0\.mlp\.gate\.weight"):
        LLM(path, **SMALL_KV)


def test_unexpected_expert_is_named(moe_dir, tmp_path):
    def add(t):
        t["model.layers.0.mlp.experts.8.down_proj.weight"] = t["model.layers.0.mlp.experts.0.down_proj.weight"].clone()

    path = _edited_copy(moe_dir, tmp_path / "m", add)
    with pytest.raises(ValueError, match=r"does not.*model\.layers\.0\.mlp\.experts\.8\.down_proj\.weight"):
        LLM(path, **SMALL_KV)


@pytest.mark.parametrize("proj, cut", [("gate_proj", 0), ("down_proj", 1)])
def test_wrong_expert_shape_is_named(moe_dir, tmp_path, proj, cut):
    name = f"model.layers.2.mlp.experts.3.{proj}.weight"

    def shrink(t):
        t[name] = t[name].narrow(cut, 0, t[name].shape[cut] - 1).contiguous()

    path = _edited_copy(moe_dir, tmp_path / "m", shrink)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*shape"):
        LLM(path, **SMALL_KV)


# ---- on a GPU ------------------------------------------------------------------------------------

def check_on_gpu(path: str, ids: list[list[int]], expected: list[list[int]], eager: bool) -> None:
    """The CUDA path (Triton fused MoE, attention kernels, decode graphs) in float32 against
    transformers on CPU: the same greedy tokens, but for rare near ties."""
    llm = LLM(path, dtype="float32", kvcache_block_size=16, enforce_eager=eager, gpu_memory_utilization=0.3,
              max_model_len=256)
    experts = next(layer.mlp.experts for layer in llm.engine.runner.model.model.layers if hasattr(layer.mlp, "experts"))
    assert experts.fused_experts.__module__ == "myvllm.kernels.triton_fused_moe"
    outs = run_checked(llm, ids, GREEDY)
    del llm, experts
    gc.collect()
    torch.cuda.empty_cache()
    same = sum(o.outputs[0].token_ids == ref for o, ref in zip(outs, expected))
    assert same >= len(ids) - 1, f"{same}/{len(ids)} sequences equal transformers'"


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_gpu_float32_matches_transformers(moe_dir, moe_reference, eager):
    check_on_gpu(moe_dir, *moe_reference, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_gpu_float32_wide_routing_matches_transformers(wide_moe, eager):
    check_on_gpu(*wide_moe, eager)


# ---- CPU without triton; bench.py ----------------------------------------------------------------

def test_cpu_path_runs_without_triton(moe_dir):
    from test_basics import NO_TRITON_SCRIPT, run_python

    proc = run_python(["-c", NO_TRITON_SCRIPT, moe_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_runs_the_moe_model_on_cpu(moe_dir):
    from test_basics import THROUGHPUT_LINE, run_python

    proc = run_python(["bench.py", "--model", moe_dir, "--device", "cpu", "--num-seqs", "2",
                       "--max-input-len", "30", "--max-output-len", "4", "--block-size", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(t) for t in THROUGHPUT_LINE.findall(proc.stdout)] == [2 * 4]


def test_bench_takes_builtin_shapes_by_name(monkeypatch):
    import bench

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.update(kwargs, model=model)
        raise Stop

    monkeypatch.setattr(bench, "LLM", fake_llm)
    with pytest.raises(Stop):
        bench.main(["--model", "dummy:qwen3-30b-a3b", "--device", "cpu", "--num-seqs", "1", "-tp", "2"])
    assert seen["model"] == "dummy:qwen3-30b-a3b" and seen["load_format"] == "dummy"
    assert seen["skip_tokenizer_init"] and seen["tensor_parallel_size"] == 2
