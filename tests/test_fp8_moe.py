"""Block-FP8 Qwen3-MoE checkpoints (Qwen/Qwen3-30B-A3B-FP8 format) on CPU in float32: a tiny FP8
MoE checkpoint (linears and every expert's gate/up/down quantized, the router not) loads, and
greedy decoding equals transformers' Qwen3MoeForCausalLM on its dequantized weights; TP=2 equals
TP=1; broken expert scales are refused naming the tensor; each rank holds its blocks of the
experts; random FP8 experts for load_format="dummy". On a GPU: the engine with the Triton FP8
fused MoE, CUDA graphs against eager.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, run_checked
from fp8_checkpoint import QUANT_CONFIG, build_fp8_pair, write_fp8_checkpoint
from safetensors.torch import load_file
from test_moe import build_moe_checkpoint, load_hf_moe
from tiny_model import greedy_reference

from myvllm import LLM, SamplingParams
from myvllm.distributed.parallel_state import TensorParallelGroup
from myvllm.kernels import reference_fp8
from myvllm.layers.fused_moe import FusedMoE
from myvllm.layers.quantization.config import Fp8Config
from myvllm.layers.quantization.fp8_moe import Fp8MoEMethod

NUM_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
FP8 = torch.float8_e4m3fn
NUM_EXPERTS = 8
# Whole blocks where tensor parallelism splits (q 256 = 2 heads of 128, k = v 128, the dense MLP's
# and each expert's intermediate 256, so 128 per rank at TP=2); the hidden size 192 ends in a
# ragged block (the rows of o_proj, down_proj and the experts' down, the columns of the rest).
FP8_MOE_SHAPES = dict(hidden_size=192, intermediate_size=256, moe_intermediate_size=256, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128)
# As Qwen's FP8 MoE checkpoints: the routers named (they are never quantized in any case), and a
# dense layer's down_proj kept unquantized
MOE_QUANT_CONFIG = {**QUANT_CONFIG, "modules_to_not_convert": [
    "lm_head", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]}
EXPERT = "model.layers.2.mlp.experts"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_thread) -> dict:
    """A 3-layer MoE (layers 0 and 2 sparse, 8 experts top-2; layer 1 dense), its FP8 checkpoint
    and the dequantized twin."""
    root = tmp_path_factory.mktemp("fp8-moe")
    src = build_moe_checkpoint(str(root / "src"), num_experts=NUM_EXPERTS, **FP8_MOE_SHAPES)
    tensors = build_fp8_pair(src, str(root / "fp8"), str(root / "dequant"), MOE_QUANT_CONFIG)
    return dict(root=root, src=src, fp8=str(root / "fp8"), dequant=str(root / "dequant"), tensors=tensors)


@pytest.fixture(scope="module")
def reference(dirs):
    return greedy_reference(dirs["fp8"], load_hf_moe(dirs["dequant"]), PROMPTS[:6], NUM_TOKENS)


def experts_of(llm: LLM, layer: int = 2) -> FusedMoE:
    return llm.engine.runner.model.model.layers[layer].mlp.experts


def broken(dirs, name: str, tensors: dict) -> str:
    return write_fp8_checkpoint(dirs["src"], str(dirs["root"] / name), tensors, MOE_QUANT_CONFIG)


def check_equal(outputs, expected) -> None:
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}: {out.outputs[0].token_ids} != {ref}"


def test_checkpoint_is_in_the_published_format(dirs):
    t = dirs["tensors"]
    gate, gate_s = t[f"{EXPERT}.3.gate_proj.weight"], t[f"{EXPERT}.3.gate_proj.weight_scale_inv"]
    assert gate.dtype == FP8 and gate_s.dtype == torch.bfloat16
    assert tuple(gate.shape) == (256, 192) and tuple(gate_s.shape) == (2, 2)  # ragged last column block
    assert tuple(t[f"{EXPERT}.3.down_proj.weight_scale_inv"].shape) == (2, 2)  # 192 rows: ragged
    assert t["model.layers.2.mlp.gate.weight"].dtype == torch.float32  # the router
    assert "model.layers.2.mlp.gate.weight_scale_inv" not in t


def test_greedy_matches_transformers_on_dequantized_weights(dirs, reference):
    ids, expected = reference
    llm = LLM(dirs["fp8"], **SMALL_KV)
    experts = experts_of(llm)
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == FP8
    assert experts.w13_weight_scale_inv.dtype == torch.float32
    assert tuple(experts.w13_weight_scale_inv.shape) == (NUM_EXPERTS, 4, 2)
    assert tuple(experts.w2_weight_scale_inv.shape) == (NUM_EXPERTS, 2, 2)
    assert experts.fused_experts.__module__ == "myvllm.kernels.reference_fp8_moe"  # CPU: dequantized
    layers = llm.engine.runner.model.model.layers
    assert layers[2].mlp.gate.weight.dtype == torch.float32  # the router: unquantized
    assert layers[0].self_attn.qkv_proj.weight.dtype == FP8 and layers[1].mlp.gate_up_proj.weight.dtype == FP8
    # expert e's gate scales, then its up scales, stacked
    t = dirs["tensors"]
    stacked = torch.cat([t[f"{EXPERT}.5.{p}_proj.weight_scale_inv"] for p in ("gate", "up")]).float()
    assert torch.equal(experts.w13_weight_scale_inv[5], stacked)
    assert torch.equal(experts.w2_weight[5].view(torch.uint8), t[f"{EXPERT}.5.down_proj.weight"].view(torch.uint8))
    check_equal(run_checked(llm, ids, GREEDY), expected)


def test_tp2_matches_tp1(dirs, reference):
    ids, expected = reference
    llm = LLM(dirs["fp8"], tensor_parallel_size=2, kvcache_block_size=16, max_num_batched_tokens=32, **SMALL_KV)
    try:
        assert tuple(experts_of(llm).w13_weight.shape) == (NUM_EXPERTS, 256, 192)  # 128 gate + 128 up rows
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY)
    finally:
        llm.shutdown()
    check_equal(outputs, expected)


def test_float32_scales_load_as_bf16_ones_do(dirs):
    tensors = {n: t.float() if n.endswith("_scale_inv") else t for n, t in dirs["tensors"].items()}
    ours = experts_of(LLM(broken(dirs, "fp32-scales", tensors), **SMALL_KV)).state_dict()
    reference = experts_of(LLM(dirs["fp8"], **SMALL_KV)).state_dict()
    assert ours.keys() == reference.keys() == {"w13_weight", "w13_weight_scale_inv", "w2_weight",
                                               "w2_weight_scale_inv"}
    for name, value in reference.items():
        assert torch.equal(ours[name].float(), value.float()), name


@pytest.mark.parametrize("proj", ["up_proj", "down_proj"])
def test_missing_expert_scale_is_named(dirs, proj):
    name = f"{EXPERT}.5.{proj}.weight_scale_inv"
    tensors = dict(dirs["tensors"])
    del tensors[name]
    with pytest.raises(ValueError, match=r"lacks.*" + re.escape(name)):
        LLM(broken(dirs, "missing-" + proj, tensors), **SMALL_KV)


@pytest.mark.parametrize("proj, dim", [("gate_proj", 0), ("gate_proj", 1), ("down_proj", 1)])
def test_misshaped_expert_scale_is_named(dirs, proj, dim):
    name = f"{EXPERT}.3.{proj}.weight_scale_inv"
    tensors = dict(dirs["tensors"])
    scale = tensors[name]
    tensors[name] = torch.cat([scale, scale.narrow(dim, 0, 1)], dim=dim)  # one block too many
    with pytest.raises(ValueError, match=re.escape(name) + ".*shape"):
        LLM(broken(dirs, f"misshaped-{proj}-{dim}", tensors), **SMALL_KV)


def test_unquantized_expert_weight_is_named(dirs):
    name = f"{EXPERT}.0.up_proj.weight"
    tensors = dict(dirs["tensors"])
    tensors[name] = tensors[name].float()
    with pytest.raises(ValueError, match=re.escape(name) + ".*float8_e4m3fn"):
        LLM(broken(dirs, "unquantized-expert", tensors), **SMALL_KV)


def test_scale_of_the_router_is_refused(dirs):
    tensors = dict(dirs["tensors"])
    tensors["model.layers.0.mlp.gate.weight_scale_inv"] = torch.ones(1, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"does not.*model\.layers\.0\.mlp\.gate\.weight_scale_inv"):
        LLM(broken(dirs, "router-scale", tensors), **SMALL_KV)


def test_experts_named_in_modules_to_not_convert(dirs, tmp_path):
    """All of a layer's experts skipped: that layer's experts load unquantized; some of them
    skipped: refused (one matrix holds them all)."""
    qc = {**MOE_QUANT_CONFIG, "modules_to_not_convert": [*MOE_QUANT_CONFIG["modules_to_not_convert"], EXPERT]}
    tensors = {n: t for n, t in dirs["tensors"].items() if not n.startswith(EXPERT)}
    unquantized = load_file(os.path.join(dirs["src"], "model.safetensors"))
    tensors.update({n: t for n, t in unquantized.items() if n.startswith(EXPERT)})
    llm = LLM(write_fp8_checkpoint(dirs["src"], str(tmp_path / "skip"), tensors, qc), **SMALL_KV)
    assert experts_of(llm, 2).w13_weight.dtype == torch.float32 and experts_of(llm, 0).w13_weight.dtype == FP8
    qc = {**MOE_QUANT_CONFIG, "modules_to_not_convert": [f"{EXPERT}.3.down_proj"]}
    with pytest.raises(ValueError, match=r"some but not all expert projections.*experts\.3\.down_proj"):
        LLM(write_fp8_checkpoint(dirs["src"], str(tmp_path / "partial"), dict(dirs["tensors"]), qc), **SMALL_KV)


def rank_experts(rank: int, size: int, inter: int = 512, hidden: int = 192) -> FusedMoE:
    """The FP8 experts of rank `rank` of `size` (no process group: only their loaders run)."""
    method = Fp8MoEMethod(Fp8Config(), torch.device("cpu"), torch.float32)
    return FusedMoE(2, hidden, inter, None, TensorParallelGroup(rank=rank, size=size), method, "model.layers.0.mlp")


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_holds_its_blocks_of_every_expert(rank):
    experts = rank_experts(rank, 2)  # 256 intermediate rows per rank: 2 blocks of gate, 2 of up
    gen = torch.Generator().manual_seed(rank)
    for e in range(2):
        parts = {}
        for proj, shape in (("gate_proj", (512, 192)), ("up_proj", (512, 192)), ("down_proj", (192, 512))):
            q, s = reference_fp8.quantize_weight(torch.randn(*shape, generator=gen), scale_dtype=torch.bfloat16)
            param = experts.w2_weight if proj == "down_proj" else experts.w13_weight
            scale = experts.w2_weight_scale_inv if proj == "down_proj" else experts.w13_weight_scale_inv
            param.weight_loader(param, q, (e, proj))
            scale.weight_loader(scale, s, (e, proj))
            parts[proj] = q, s
        rows = slice(256 * rank, 256 * (rank + 1))
        blocks = slice(2 * rank, 2 * (rank + 1))
        (gq, gs), (uq, us), (dq, ds) = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
        assert torch.equal(experts.w13_weight_scale_inv[e], torch.cat([gs[blocks], us[blocks]]).float())
        assert torch.equal(experts.w2_weight_scale_inv[e], ds[:, blocks].float())
        assert torch.equal(experts.w13_weight[e].view(torch.uint8), torch.cat([gq[rows], uq[rows]]).view(torch.uint8))
        assert torch.equal(experts.w2_weight[e].view(torch.uint8), dq[:, rows].view(torch.uint8))
        # the rank's dequantized down columns are those of the whole expert
        whole = reference_fp8.dequantize_weight(dq, ds, 128, 128, torch.float32)
        ours = reference_fp8.dequantize_weight(experts.w2_weight[e], experts.w2_weight_scale_inv[e], 128, 128,
                                               torch.float32)
        assert torch.equal(ours, whole[:, rows])


@pytest.mark.parametrize("inter, size", [(768, 4), (384, 2), (192, 1)])
def test_expert_shards_off_the_block_grid_are_refused(inter, size):
    """Qwen3-30B-A3B's 768 over 4 ranks (192 each) splits a block between ranks."""
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.mlp\.experts: moe_intermediate_size per rank "
                                         rf"{inter // size} .*tensor_parallel_size={size}.*\[128, 128\]"):
        rank_experts(0, size, inter)


def build_on_meta(name: str, tp_size: int):
    """The built-in shape set `name` in block-FP8, rank 0 of tp_size, built on the meta device
    (shapes and dtypes only, no memory)."""
    from myvllm.attention.torch_backend import TorchAttentionBackend
    from myvllm.config import ModelConfig
    from myvllm.kernels.fused_ops import FusedOps
    from myvllm.models.qwen3_moe import Qwen3MoeForCausalLM

    cfg = ModelConfig.builtin(name).with_quantization("fp8", "dummy")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return cfg, Qwen3MoeForCausalLM(cfg, 4096, TorchAttentionBackend(), FusedOps(False, "cpu"),
                                            TensorParallelGroup(0, tp_size))
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name, tp_size", [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 2), ("qwen3-235b-a22b", 4)])
def test_published_shapes_are_built_in_fp8(name, tp_size):
    """Every projection and expert of the decoder is created in fp8 (no unquantized copy is ever
    made): the bf16 parameters are the embeddings, LM head, norms and routers only."""
    cfg, model = build_on_meta(name, tp_size)
    by_dtype: dict[torch.dtype, int] = {}
    for n, p in model.named_parameters():
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
        if p.dtype == torch.bfloat16:
            assert n.endswith(("norm.weight", "mlp.gate.weight")) or n.startswith(("model.embed_tokens", "lm_head")), n
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size // tp_size, cfg.num_experts
    experts = cfg.num_hidden_layers * e * 3 * h * i
    assert experts < by_dtype[FP8] < experts * 1.1  # the experts, plus the attention projections


def test_off_grid_expert_shards_of_a_published_model_are_refused():
    with pytest.raises(ValueError, match=r"experts: moe_intermediate_size per rank 192.*tensor_parallel_size=4"):
        build_on_meta("qwen3-30b-a3b", 4)


def test_dummy_fp8_experts(dirs):
    llm = LLM(dirs["src"], quantization="fp8", load_format="dummy", **SMALL_KV)
    experts = experts_of(llm)
    assert experts.w13_weight.dtype == FP8 and experts.w2_weight_scale_inv.dtype == torch.float32
    w = reference_fp8.dequantize_weight(experts.w13_weight, experts.w13_weight_scale_inv, 128, 128, torch.float32)
    assert 0.01 < w.std().item() < 0.04  # N(0, 0.02) quantized
    assert not torch.equal(w[0], w[1])  # each expert its own values
    params = llm.engine.runner.model.named_parameters()
    assert not [n for n, p in params if "experts" in n and p.dtype not in (FP8, torch.float32)]
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_cpu_path_runs_without_triton(dirs):
    from test_basics import NO_TRITON_SCRIPT, run_python

    proc = run_python(["-c", NO_TRITON_SCRIPT, dirs["fp8"]])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
def test_gpu_graphs_match_eager(dirs, reference):
    """The Triton FP8 fused MoE in the engine: the same tokens replayed from CUDA graphs as eager
    (but for one prompt at most: a padded graph batch may take another bf16 GEMM algorithm for
    the router and the LM head, which can break a near tie of the random weights otherwise)."""
    ids, _ = reference
    outs = {}
    for eager in (True, False):
        llm = LLM(dirs["fp8"], dtype="bfloat16", kvcache_block_size=16, enforce_eager=eager,
                  gpu_memory_utilization=0.3, max_model_len=256)
        assert experts_of(llm).fused_experts.__module__ == "myvllm.kernels.triton_fp8_moe"
        outs[eager] = [o.outputs[0].token_ids for o in run_checked(llm, ids, GREEDY)]
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs[True], outs[False]))
    assert same >= len(ids) - 1, (outs[True], outs[False])
