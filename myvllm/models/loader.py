"""Weight loading: strict safetensors loading, or random "dummy" weights.

Only safetensors files are read (never pickle). Loading is strict: a tensor the
model does not have, a parameter the checkpoint lacks, or a shape mismatch raises
a ValueError naming the tensor. Packed parameters (qkv_proj, gate_up_proj) are
filled slice by slice through each parameter's `weight_loader`. A block-FP8 layer's
`*.weight_scale_inv` tensors are parameters like any other (layers/quantization/fp8.py gives
them their loaders), so a missing or mis-shaped scale fails the same way; with an index file,
the tensors the files hold must be the ones its weight_map lists.
The stacked experts of an MoE layer are filled the same way, one checkpoint tensor per expert
and projection (`expert_params_mapping`); block-FP8 experts' `*.weight_scale_inv` tensors map
to their stacked scales (`w13_weight_scale_inv`, `w2_weight_scale_inv`) through the same
entries (layers/quantization/fp8_moe.py gives those their loaders).

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


def read_weight_map(path: str) -> dict[str, str] | None:
    """The index's tensor name -> file name, None without an index file."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        weight_map = json.load(f).get("weight_map", {})
    if not isinstance(weight_map, dict):
        raise ValueError(f"{INDEX_FILE} in {path!r}: weight_map is not a JSON object")
    return weight_map


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those of the index if there is one, else all."""
    weight_map = read_weight_map(path)
    if weight_map is not None:
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


def _mappings(model: nn.Module) -> list[tuple[str, str, object]]:
    """(checkpoint name part, parameter name part, shard id) of every tensor that fills a slice
    of a parameter: the model's expert_params_mapping (MoE: one entry per expert and projection)
    first, its names containing the packed ones (experts.0.gate_proj), then packed_modules_mapping."""
    mappings = list(getattr(model, "expert_params_mapping", ()))
    for ckpt_part, (param_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        mappings.append((f".{ckpt_part}.", f".{param_part}.", shard_id))
    return mappings


def _target(mappings: list[tuple[str, str, object]], name: str) -> tuple[str, object]:
    """Checkpoint name -> (parameter name, shard id) through the first mapping that matches."""
    for ckpt_part, param_part, shard_id in mappings:
        if ckpt_part in name:
            return name.replace(ckpt_part, param_part), shard_id
    for ckpt_suffix, param_suffix in KV_SCALE_NAMES.items():
        if name.endswith(ckpt_suffix):
            return name.removesuffix(ckpt_suffix) + param_suffix, None
    return name, None


def _missing_shards(name: str, want: set, have: set, mappings: list[tuple[str, str, object]]) -> str:
    """A parameter some of whose shards no tensor filled, with the checkpoint tensors that would."""
    lacking = want - have
    tensors = [name.replace(param_part, ckpt_part) for ckpt_part, param_part, shard_id in mappings
               if shard_id in lacking and param_part in name]
    more = f" and {len(tensors) - 4} more" if len(tensors) > 4 else ""
    return f"{name} (shards {sorted(map(str, lacking))[:4]}: {tensors[:4]}{more})"


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, Loaded]],
                 tie_word_embeddings: bool) -> None:
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {name: set() for name in params}
    mappings = _mappings(model)
    # parameter name part -> the shard ids that fill the parameters holding it
    expected_shards: dict[str, set] = {}
    for _ckpt, param_part, shard_id in mappings:
        expected_shards.setdefault(param_part, set()).add(shard_id)
    unexpected = []
    for name, tensor in tensors:
        if tie_word_embeddings and name == "lm_head.weight":
            continue  # tied to the embedding; some checkpoints store the copy anyway
        param_name, shard_id = _target(mappings, name)
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
        want = next((want for part, want in expected_shards.items() if part in name), {None})
        if shards != want and not (not shards and getattr(params[name], "checkpoint_optional", False)):
            missing.append(name if want == {None} else _missing_shards(name, want, shards, mappings))
    if missing:
        raise ValueError(f"checkpoint lacks tensor(s): {missing[:10]}")


def _listed(tensors: Iterator[tuple[str, CheckpointTensor]], weight_map: dict[str, str], path: str):
    """tensors, checking that each is in weight_map under its file and that none listed is missing."""
    seen = set()
    for name, tensor in tensors:
        file = os.path.basename(tensor.path)
        if weight_map.get(name) != file:
            raise ValueError(f"tensor {name!r} of {file!r} is not listed under that file in {INDEX_FILE} of {path!r}")
        seen.add(name)
        yield name, tensor
    unread = sorted(set(weight_map) - seen)
    if unread:
        raise ValueError(f"{INDEX_FILE} of {path!r} lists tensor(s) its files do not hold: {unread[:10]}")


def load_checkpoint(model: nn.Module, path: str, tie_word_embeddings: bool) -> None:
    files = safetensors_files(path)
    logger.info("loading %d safetensors file(s) from %s", len(files), path)
    tensors = iterate_tensors(files)
    weight_map = read_weight_map(path)
    load_weights(model, tensors if weight_map is None else _listed(tensors, weight_map, path), tie_word_embeddings)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights: N(0, DUMMY_STD) for matrices, ones for norm weights; a layer with a
    quant_method gets its own (quantized random values); optional parameters keep their defaults."""
    gen = None
    quantized = {name: m for name, m in model.named_modules() if getattr(m, "quant_method", None) is not None}
    for name, param in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        if name.rpartition(".")[0] in quantized:
            continue
        if getattr(param, "checkpoint_optional", False):
            continue  # its default (the KV cache scales' 1.0)
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, DUMMY_STD, generator=gen)
    for module in quantized.values():
        module.quant_method.init_dummy(module, DUMMY_STD, gen)
