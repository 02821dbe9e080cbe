"""Tiny block-FP8 checkpoints in the published format (Qwen/Qwen3-*-FP8), and their dequantized
twins for transformers as the oracle.

The FP8 checkpoint holds each quantized linear's (and MoE expert projection's) `weight` as float8_e4m3fn and
`weight_scale_inv` as bfloat16, one scale per 128 x 128 block, in two safetensors shards with an
index, and config.json carries the quantization_config; the other tensors are kept as they are.
The dequantized twin holds weight * scale in float32 in place of each pair, so transformers'
Qwen3ForCausalLM on it computes what the FP8 model stands for.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from myvllm.kernels.reference_fp8 import dequantize_weight, quantize_weight

BLOCK = 128
QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")
# Shapes whose packed projections are whole blocks (q 256, k = v 128, gate = up 256) and whose
# hidden size 192 ends in a ragged block (o_proj and down_proj rows, the columns of the others).
FP8_SHAPES = dict(num_layers=2, hidden=192, heads=2, kv_heads=1, head_dim=128, intermediate=256)
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"]}


def quantize_state(state: dict[str, torch.Tensor], skipped: tuple[str, ...]) -> tuple[dict, dict]:
    """(FP8 checkpoint tensors, dequantized float32 tensors) of an unquantized state dict."""
    fp8, dequant = {}, {}
    for name, w in state.items():
        if QUANTIZED.match(name) and name.removesuffix(".weight") not in skipped:
            q, scale = quantize_weight(w, BLOCK, BLOCK, scale_dtype=torch.bfloat16)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            dequant[name] = dequantize_weight(q, scale, BLOCK, BLOCK, torch.float32)
        else:
            fp8[name], dequant[name] = w, w
    return fp8, dequant


def copy_dir_without_weights(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def write_sharded(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards (layer 0 and the embeddings; the rest) and model.safetensors.index.json."""
    first = {n: t for n, t in tensors.items() if n.startswith(("model.layers.0.", "model.embed_tokens."))}
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in first}}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: t.contiguous() for n, t in part.items()}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def set_quantization_config(path: str, qc: dict | None) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if qc is not None:
        config["quantization_config"] = qc
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def write_fp8_checkpoint(src: str, dst: str, tensors: dict[str, torch.Tensor], qc: dict = QUANT_CONFIG) -> str:
    """An FP8 checkpoint directory dst: src's config (with qc) and tokenizer, `tensors` as weights."""
    copy_dir_without_weights(src, dst)
    set_quantization_config(dst, qc)
    write_sharded(dst, tensors)
    return dst


def build_fp8_pair(src: str, fp8_dir: str, dequant_dir: str, qc: dict = QUANT_CONFIG) -> dict[str, torch.Tensor]:
    """From the unquantized checkpoint src: the FP8 checkpoint (quantization_config qc) and its
    dequantized twin; returns the FP8 checkpoint's tensors."""
    state = load_file(os.path.join(src, "model.safetensors"))
    skipped = tuple(qc["modules_to_not_convert"])
    fp8, dequant = quantize_state(state, skipped)
    write_fp8_checkpoint(src, fp8_dir, fp8, qc)
    copy_dir_without_weights(src, dequant_dir)
    save_file(dequant, os.path.join(dequant_dir, "model.safetensors"))
    return fp8
