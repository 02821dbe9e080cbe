"""Checkpoint layouts load and match transformers; broken checkpoints fail naming the tensor."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from engine_utils import SMALL_KV
from safetensors.torch import load_file, save_file
from tiny_model import build_checkpoint, hf_greedy, load_hf_model

from myvllm import LLM, SamplingParams
from myvllm.config import ModelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300, 17, 42, 9, 9, 1], [3]]


def assert_matches_transformers(path: str, **engine_kw) -> None:
    hf = load_hf_model(path)
    llm = LLM(path, kvcache_block_size=16, **{**SMALL_KV, **engine_kw})
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 10)[0]


@pytest.mark.parametrize(
    "layout",
    [
        dict(tie=True, heads=4, kv_heads=2),  # Qwen3-0.6B-like: tied embeddings
        dict(tie=False, heads=4, kv_heads=1, max_shard_size="100KB"),  # 8B-like: untied, sharded, GQA 4
        dict(tie=False, heads=8, kv_heads=2, head_dim=16, max_shard_size="60KB"),  # GQA 4, head_dim 16
        dict(tie=True, heads=2, kv_heads=2, num_layers=3),  # no GQA
    ],
)
def test_layouts_match_transformers(tmp_path, layout):
    path = build_checkpoint(str(tmp_path / "m"), **layout)
    if "max_shard_size" in layout:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert_matches_transformers(path)


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    path = build_checkpoint(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert ModelConfig.from_hf(path).torch_dtype == torch.bfloat16
    llm = LLM(path, device="cpu", cpu_kv_cache_gib=0.01, kvcache_block_size=16)
    assert llm.engine.runner.dtype == torch.bfloat16
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks.*layers\.1\.self_attn\.qkv_proj.*k"):
        LLM(path, **SMALL_KV)


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.extra\.weight"):
        LLM(path, **SMALL_KV)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    _edit_weights(path, shrink)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*shape"):
        LLM(path, **SMALL_KV)


def test_truncated_file_is_reported(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(path, **SMALL_KV)


def test_garbage_file_is_reported(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(path, **SMALL_KV)


def test_pickle_checkpoints_are_not_read(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(path, **SMALL_KV)


@pytest.mark.parametrize("arch, model_type", [("LlamaForCausalLM", "llama"), ("Qwen2MoeForCausalLM", "qwen2_moe")])
def test_other_architectures_are_refused(tiny_model_dir, tmp_path, arch, model_type):
    path = _copy(tiny_model_dir, tmp_path / "m")
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["architectures"], cfg["model_type"] = [arch], model_type
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=arch):
        LLM(path, **SMALL_KV)


def test_dummy_weights_need_no_files():
    llm = LLM("dummy:qwen3-0.6b", load_format="dummy", skip_tokenizer_init=True, device="cpu",
              dtype="float32", num_kv_blocks=16, max_model_len=256, kvcache_block_size=16)
    cfg = llm.engine.model_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        1024, 28, 16, 8)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_dummy_load_format_with_a_config_dir(tiny_model_dir):
    llm = LLM(tiny_model_dir, load_format="dummy", **SMALL_KV)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
