"""Block-FP8 checkpoints (Qwen/Qwen3-*-FP8 format) on CPU in float32: a tiny FP8 checkpoint loads
and greedy decoding equals transformers on its dequantized weights, TP=2 equals TP=1, malformed
checkpoints and quantization configs are refused with ValueErrors naming the tensor or field,
and the Triton kernels agree with the torch reference (through Triton's interpreter).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from engine_utils import PROMPTS, SMALL_KV, run_checked
from fp8_checkpoint import FP8_SHAPES, QUANT_CONFIG, build_fp8_pair, write_fp8_checkpoint
from tiny_model import build_checkpoint, greedy_reference, load_hf_model

from myvllm import LLM, SamplingParams
from myvllm.config import EngineConfig
from myvllm.kernels import reference_fp8
from myvllm.layers.quantization.config import Fp8Config

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NUM_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
FP8 = torch.float8_e4m3fn
LAYER0_QKV = "model.layers.0.self_attn.qkv_proj"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_thread) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    src = build_checkpoint(str(root / "bf16"), **FP8_SHAPES)
    tensors = build_fp8_pair(src, str(root / "fp8"), str(root / "dequant"))
    return dict(root=root, src=src, fp8=str(root / "fp8"), dequant=str(root / "dequant"), tensors=tensors)


@pytest.fixture(scope="module")
def reference(dirs):
    """Prompt ids and transformers' greedy continuations on the dequantized weights."""
    return greedy_reference(dirs["fp8"], load_hf_model(dirs["dequant"]), PROMPTS[:6], NUM_TOKENS)


def model_of(llm: LLM):
    return llm.engine.runner.model


def test_checkpoint_is_in_the_published_format(dirs):
    t = dirs["tensors"]
    q, s = t["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert q.dtype == FP8 and s.dtype == torch.bfloat16
    assert tuple(q.shape) == (256, 192) and tuple(s.shape) == (2, 2)  # ragged last column block
    assert tuple(t["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape) == (2, 2)  # 192 rows: ragged
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32  # modules_to_not_convert
    assert "model.layers.1.mlp.down_proj.weight_scale_inv" not in t


def test_greedy_matches_transformers_on_dequantized_weights(dirs, reference):
    ids, expected = reference
    llm = LLM(dirs["fp8"], **SMALL_KV)
    model = model_of(llm)
    layer0 = model.model.layers[0]
    assert layer0.self_attn.qkv_proj.weight.dtype == FP8
    assert layer0.self_attn.qkv_proj.weight_scale_inv.dtype == torch.float32
    assert layer0.mlp.down_proj.weight.dtype == FP8
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32  # not converted
    assert not hasattr(model.model.layers[1].mlp.down_proj, "weight_scale_inv")
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    # the packed scales are the projections' scales stacked: q rows, then k, then v
    t = dirs["tensors"]
    stacked = torch.cat([t[f"model.layers.0.self_attn.{p}_proj.weight_scale_inv"] for p in "qkv"]).float()
    assert torch.equal(layer0.self_attn.qkv_proj.weight_scale_inv.cpu(), stacked)
    outputs = run_checked(llm, ids, GREEDY)
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}: {out.outputs[0].token_ids} != {ref}"


def test_tp2_matches_tp1(dirs, reference):
    ids, expected = reference
    llm = LLM(dirs["fp8"], tensor_parallel_size=2, kvcache_block_size=16, max_num_batched_tokens=32, **SMALL_KV)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY)
    finally:
        llm.shutdown()
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i}: {out.outputs[0].token_ids} != {ref}"


def test_float32_scales_load_as_bf16_ones_do(dirs):
    tensors = {n: t.float() if n.endswith("_scale_inv") else t for n, t in dirs["tensors"].items()}
    ours = model_of(LLM(broken(dirs, "fp32-scales", tensors), **SMALL_KV)).state_dict()
    reference = model_of(LLM(dirs["fp8"], **SMALL_KV)).state_dict()
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(ours[name].float(), value.float()), name


def broken(dirs, name: str, tensors: dict) -> str:
    return write_fp8_checkpoint(dirs["src"], str(dirs["root"] / name), tensors)


def test_missing_scale_is_named(dirs):
    tensors = dict(dirs["tensors"])
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale_inv"):
        LLM(broken(dirs, "missing", tensors), **SMALL_KV)


def test_missing_packed_scale_is_named(dirs):
    tensors = dict(dirs["tensors"])
    del tensors["model.layers.1.self_attn.k_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight_scale_inv.*k"):
        LLM(broken(dirs, "missing-k", tensors), **SMALL_KV)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.weight_scale_inv",
                                  "model.layers.1.mlp.up_proj.weight_scale_inv"])
def test_misshaped_scale_is_named(dirs, name):
    tensors = dict(dirs["tensors"])
    scale = tensors[name]
    tensors[name] = torch.cat([scale, scale[:1]])  # one block row too many
    with pytest.raises(ValueError, match=re.escape(name) + ".*shape"):
        LLM(broken(dirs, "misshaped-" + name, tensors), **SMALL_KV)


def test_unquantized_weight_in_an_fp8_layer_is_named(dirs):
    tensors = dict(dirs["tensors"])
    name = "model.layers.0.mlp.gate_proj.weight"
    tensors[name] = tensors[name].float()
    with pytest.raises(ValueError, match=re.escape(name) + ".*float8_e4m3fn"):
        LLM(broken(dirs, "unquantized", tensors), **SMALL_KV)


def test_scale_of_a_module_not_converted_is_refused(dirs):
    tensors = dict(dirs["tensors"])
    tensors["model.layers.1.mlp.down_proj.weight_scale_inv"] = torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale_inv"):
        LLM(broken(dirs, "extra-scale", tensors), **SMALL_KV)


def test_index_must_list_the_files_tensors(dirs):
    import json

    path = broken(dirs, "bad-index", dict(dirs["tensors"]))
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"]["model.layers.0.mlp.up_proj.weight_scale_inv2"] = "model-00001-of-00002.safetensors"
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale_inv2"):
        LLM(path, **SMALL_KV)


@pytest.mark.parametrize("field, value", [
    ("quant_method", "gptq"), ("fmt", "e5m2"), ("activation_scheme", "static"),
    ("weight_block_size", [64, 64]), ("weight_block_size", None), ("modules_to_not_convert", "lm_head"),
])
def test_bad_quantization_config_names_the_field(field, value):
    qc = {**QUANT_CONFIG, field: value}
    with pytest.raises(ValueError, match=rf"quantization_config\.{field}"):
        Fp8Config.from_hf(qc)


def test_bad_quantization_config_in_a_checkpoint(dirs, tmp_path):
    path = write_fp8_checkpoint(dirs["src"], str(tmp_path / "awq"), dict(dirs["tensors"]),
                                {**QUANT_CONFIG, "quant_method": "awq"})
    with pytest.raises(ValueError, match=r"quant_method='awq'"):
        LLM(path, **SMALL_KV)


def test_modules_to_not_convert_matching():
    cfg = Fp8Config(modules_to_not_convert=("lm_head", "model.layers.1.mlp", "o_proj"))
    assert cfg.is_skipped("lm_head") and cfg.is_skipped("model.layers.1.mlp.down_proj")
    assert cfg.is_skipped("model.layers.3.self_attn.o_proj")
    assert not cfg.is_skipped("model.layers.11.mlp.down_proj") and not cfg.is_skipped("model.layers.0.mlp.up_proj")


def test_partly_skipped_packed_layer_is_refused(dirs, tmp_path):
    qc = {**QUANT_CONFIG, "modules_to_not_convert": ["model.layers.0.self_attn.k_proj"]}
    path = write_fp8_checkpoint(dirs["src"], str(tmp_path / "partial"), dict(dirs["tensors"]), qc)
    with pytest.raises(ValueError, match=r"some but not all.*k_proj"):
        LLM(path, **SMALL_KV)


def test_quantization_argument(dirs, tiny_model_dir):
    with pytest.raises(ValueError, match=r"quantization='int8'"):
        EngineConfig(model=dirs["src"], quantization="int8")
    with pytest.raises(ValueError, match=r"quantization='fp8'.*no quantization_config"):
        LLM(dirs["src"], quantization="fp8", **SMALL_KV)
    llm = LLM(dirs["fp8"], quantization="fp8", **SMALL_KV)  # matches the checkpoint
    assert model_of(llm).model.layers[0].mlp.gate_up_proj.weight.dtype == FP8
    # blocks must tile the packed projections: the conftest model's k and v have 64 rows each
    with pytest.raises(ValueError, match=r"qkv_proj.*block_n=128"):
        LLM(tiny_model_dir, quantization="fp8", load_format="dummy", **SMALL_KV)


def test_dummy_fp8_weights(dirs):
    llm = LLM(dirs["src"], quantization="fp8", load_format="dummy", **SMALL_KV)
    qkv = model_of(llm).model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8 and qkv.weight_scale_inv.dtype == torch.float32
    w = reference_fp8.dequantize_weight(qkv.weight, qkv.weight_scale_inv, 128, 128, torch.float32)
    assert 0.01 < w.std().item() < 0.04  # N(0, 0.02) quantized
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_quantize_dequantize_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 300, 200, generator=g)  # stacked like experts, ragged blocks on both dims
    q, s = reference_fp8.quantize_weight(w, 128, 128)
    assert q.dtype == FP8 and tuple(s.shape) == (3, 3, 2)
    back = reference_fp8.dequantize_weight(q, s, 128, 128, torch.float32)
    step = reference_fp8.expand_blocks(s, 300, 200, 128, 128) * 32  # e4m3: 3 mantissa bits, ulp <= amax / 8
    assert ((back - w).abs() <= step / 2 + 1e-12).all()
    amax = w[0, :128, :128].abs().max()
    assert torch.isclose(s[0, 0, 0], amax / 448)


@pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted")
@pytest.mark.parametrize("m, n, k", [(1, 256, 256), (7, 192, 320), (33, 130, 128), (20, 384, 200), (130, 160, 256),
                                     (520, 130, 128)])
def test_triton_gemm_matches_reference_interpreted(m, n, k):
    """The kernels on reference-quantized activations (Triton's interpreter rounds float32 -> fp8
    differently from the GPU, so the quantized values are compared on the GPU only)."""
    from myvllm.kernels import triton_fp8_gemm

    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    wq, ws = reference_fp8.quantize_weight(w)
    x = torch.randn(m, k, generator=g)
    xq, xs = reference_fp8.per_token_group_quant(x)
    _, kernel_scales = triton_fp8_gemm.per_token_group_quant(x)
    assert torch.equal(kernel_scales, xs)
    out = triton_fp8_gemm.block_fp8_matmul(xq, xs, wq, ws, 128, 128, torch.float32)
    ref = reference_fp8.block_fp8_matmul(xq, xs, wq, ws, 128, 128, torch.float32)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    # the oracle is the product of the dequantized operands
    dq = xq.float() * reference_fp8.expand_blocks(xs, m, k, 1, 128)
    dw = reference_fp8.dequantize_weight(wq, ws, 128, 128, torch.float32)
    assert torch.allclose(ref, dq @ dw.T, rtol=1e-5, atol=1e-6)


def test_quantization_config_in_config_json_is_read(dirs, tmp_path):
    from myvllm.config import ModelConfig

    assert ModelConfig.from_hf(dirs["fp8"]).quantization == Fp8Config(
        modules_to_not_convert=("lm_head", "model.layers.1.mlp.down_proj"))
    assert ModelConfig.from_hf(dirs["src"]).quantization is None


def rank_layer(kind: str, rank: int, size: int):
    """A layer of rank `rank` of `size` (no process group: only its loaders run), block-FP8."""
    from myvllm.distributed.parallel_state import TensorParallelGroup
    from myvllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from myvllm.layers.quantization.fp8 import Fp8LinearMethod

    tp = TensorParallelGroup(rank=rank, size=size)
    fp8 = dict(quant_method=Fp8LinearMethod(Fp8Config(), torch.device("cpu"), torch.float32), prefix=kind)
    return {"row": lambda: RowParallelLinear(512, 192, None, tp, **fp8),
            "row-ragged": lambda: RowParallelLinear(384, 192, None, tp, **fp8),
            "merged": lambda: MergedColumnParallelLinear(192, [256, 512], None, tp, **fp8),
            "merged-ragged": lambda: MergedColumnParallelLinear(192, [384, 384], None, tp, **fp8),
            "qkv": lambda: QKVParallelLinear(192, 128, 4, 1, None, tp, **fp8)}[kind]()


def random_fp8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return reference_fp8.quantize_weight(w, scale_dtype=torch.bfloat16)


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_follow_the_blocks(rank):
    row = rank_layer("row", rank, 2)  # input features split: 256 columns = 2 scale columns per rank
    q, s = random_fp8(192, 512, 0)
    row.weight.weight_loader(row.weight, q)
    row.weight_scale_inv.weight_loader(row.weight_scale_inv, s)
    assert torch.equal(row.weight.view(torch.uint8), q[:, 256 * rank:256 * (rank + 1)].view(torch.uint8))
    assert torch.equal(row.weight_scale_inv, s[:, 2 * rank:2 * (rank + 1)].float())

    merged = rank_layer("merged", rank, 2)  # gate 128 rows and up 256 rows per rank
    parts = [random_fp8(256, 192, 1), random_fp8(512, 192, 2)]
    for shard_id, (q, s) in enumerate(parts):
        merged.weight.weight_loader(merged.weight, q, shard_id)
        merged.weight_scale_inv.weight_loader(merged.weight_scale_inv, s, shard_id)
    (_, gate_s), (_, up_s) = parts
    expected = torch.cat([gate_s[rank:rank + 1], up_s[2 * rank:2 * rank + 2]]).float()
    assert torch.equal(merged.weight_scale_inv, expected)

    qkv = rank_layer("qkv", rank, 2)  # 2 of 4 q heads; the one KV head on both ranks
    parts = {"q": random_fp8(512, 192, 3), "k": random_fp8(128, 192, 4), "v": random_fp8(128, 192, 5)}
    for shard_id, (q, s) in parts.items():
        qkv.weight.weight_loader(qkv.weight, q, shard_id)
        qkv.weight_scale_inv.weight_loader(qkv.weight_scale_inv, s, shard_id)
    expected = torch.cat([parts["q"][1][2 * rank:2 * rank + 2], parts["k"][1], parts["v"][1]]).float()
    assert torch.equal(qkv.weight_scale_inv, expected)
    dequant = reference_fp8.dequantize_weight(qkv.weight, qkv.weight_scale_inv, 128, 128, torch.float32)
    ref_q = reference_fp8.dequantize_weight(*parts["q"], 128, 128, torch.float32)
    assert torch.equal(dequant[:256], ref_q[256 * rank:256 * (rank + 1)])


@pytest.mark.parametrize("kind, match", [("row-ragged", r"input features per rank 192.*block_k=128"),
                                         ("merged-ragged", r"output rows.*\[192, 192\].*block_n=128")])
def test_shards_off_the_block_grid_are_refused(kind, match):
    with pytest.raises(ValueError, match=kind + ": " + match):
        rank_layer(kind, 0, 2)
