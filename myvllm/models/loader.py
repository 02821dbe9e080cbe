"""Weight loading: strict safetensors loading, or random "dummy" weights.

Only safetensors files are read (never pickle). Loading is strict: a tensor the
model does not have, a parameter the checkpoint lacks, or a shape mismatch raises
a ValueError naming the tensor. Packed parameters (qkv_proj, gate_up_proj) are
filled slice by slice through each parameter's `weight_loader`.

Checkpoint tensors reach the weight loaders as `CheckpointTensor`s
(models/weight_utils.py), which read from the file only what is asked for: a
tensor-parallel rank narrows each one to its shard before reading, so no rank ever
holds the whole model in memory.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from myvllm.models.weight_utils import CheckpointTensor, Loaded, copy_checked

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DUMMY_STD = 0.02
# vLLM's checkpoint names of the fp8 KV cache scales -> the attention layer's parameters
# (layers/attention.py); a parameter marked `checkpoint_optional` keeps its value when absent.
KV_SCALE_NAMES = {".self_attn.k_scale": ".self_attn.attn.k_scale", ".self_attn.v_scale": ".self_attn.attn.v_scale"}


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those of the index if there is one, else all."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(path, name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {path!r} names missing file(s): {missing}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r} (only safetensors checkpoints are supported)")
    return files


def iterate_tensors(files: list[str]) -> Iterator[tuple[str, CheckpointTensor]]:
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, CheckpointTensor(f, name, file)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {file!r} (truncated or corrupt?): {e}") from e


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint name -> (parameter name, shard id) through packed_modules_mapping."""
    for ckpt_part, (param_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{param_part}."), shard_id
    for ckpt_suffix, param_suffix in KV_SCALE_NAMES.items():
        if name.endswith(ckpt_suffix):
            return name.removesuffix(ckpt_suffix) + param_suffix, None
    return name, None


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, Loaded]],
                 tie_word_embeddings: bool) -> None:
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {name: set() for name in params}
    expected_shards = {}
    for _ckpt, (param_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        expected_shards.setdefault(param_part, set()).add(shard_id)
    unexpected = []
    for name, tensor in tensors:
        if tie_word_embeddings and name == "lm_head.weight":
            continue  # tied to the embedding; some checkpoints store the copy anyway
        param_name, shard_id = _target(model, name)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        try:
            if shard_id is None:
                param.weight_loader(param, tensor) if hasattr(param, "weight_loader") else copy_checked(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from e
        loaded[param_name].add(shard_id)
    if unexpected:
        raise ValueError(f"checkpoint has tensor(s) the model does not: {unexpected[:10]}")
    missing = []
    for name, shards in loaded.items():
        part = name.split(".")[-2] if "." in name else name
        want = expected_shards.get(part, {None})
        if shards != want and not (not shards and getattr(params[name], "checkpoint_optional", False)):
            missing.append(name if want == {None} else f"{name} (shards {sorted(map(str, want - shards))})")
    if missing:
        raise ValueError(f"checkpoint lacks tensor(s): {missing[:10]}")


def load_checkpoint(model: nn.Module, path: str, tie_word_embeddings: bool) -> None:
    files = safetensors_files(path)
    logger.info("loading %d safetensors file(s) from %s", len(files), path)
    load_weights(model, iterate_tensors(files), tie_word_embeddings)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights: N(0, DUMMY_STD) for matrices, ones for norm weights; optional parameters keep
    their defaults."""
    gen = None
    for name, param in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        if getattr(param, "checkpoint_optional", False):
            continue  # its default (the KV cache scales' 1.0)
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, DUMMY_STD, generator=gen)
