"""Default sampling parameters from a checkpoint's generation_config.json (vLLM's `generation_config`).

Qwen3 checkpoints ship the sampling their authors recommend, e.g.
{"temperature": 0.6, "top_k": 20, "top_p": 0.95, "do_sample": true, ...}. The engine argument
`generation_config` picks where the defaults come from:
  - "auto" (default): the model directory's generation_config.json (none for `dummy:` models);
  - "vllm": none, the neutral SamplingParams defaults stay;
  - any other value: a folder whose generation_config.json is read.

Only keys present in the file count (transformers' GenerationConfig fills in values such as
top_k=50 that the file does not hold; those are not defaults here), and only these, with
vLLM's names: temperature, top_k, top_p, min_p, repetition_penalty, and max_new_tokens, which
becomes max_tokens. A key whose SamplingParams field does not exist is skipped with a warning.
`do_sample` is ignored, as vLLM ignores it: `do_sample: false` next to a temperature still
samples at that temperature; greedy decoding is asked for with temperature 0.

The defaults apply where the caller gives no value: `LLM.generate(prompts, None)` and the
server's request fields that the client leaves out. An explicit SamplingParams is used as is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from myvllm.config import EngineConfig
from myvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
# generation_config.json key -> SamplingParams field (vLLM's get_diff_sampling_param).
FIELD_OF_KEY = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
GENERATION_CONFIG_CHOICES = ("auto", "vllm")


def generation_config_file(config: EngineConfig, model_path: str | None) -> str | None:
    """The generation_config.json to read, or None when there is none to read.

    "auto" without a file (or without a model directory) means no defaults; a folder given
    explicitly must exist and hold the file."""
    choice = config.generation_config
    if choice == "vllm":
        return None
    if choice == "auto":
        if model_path is None:
            return None
        file = os.path.join(model_path, FILE_NAME)
        return file if os.path.isfile(file) else None
    if not os.path.isdir(choice):
        raise ValueError(f"generation_config={choice!r} is not a folder: pass "
                         f"{' or '.join(map(repr, GENERATION_CONFIG_CHOICES))}, or a folder holding {FILE_NAME}")
    file = os.path.join(choice, FILE_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"generation_config={choice!r}: the folder has no {FILE_NAME} ({file!r} is missing)")
    return file


def read_generation_file(file: str) -> dict[str, Any]:
    """The JSON object in file; anything else raises ValueError naming the file."""
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config: cannot read {file!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {file!r} must hold a JSON object, got {type(data).__name__}")
    return data


def defaults_from_dict(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The SamplingParams fields that the keys present (and not null) in data set; checked by
    building a SamplingParams from them, whose error is raised as ValueError naming source."""
    fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
    defaults: dict[str, Any] = {}
    for key, name in FIELD_OF_KEY.items():
        if data.get(key) is None:
            continue
        if name not in fields:
            logger.warning("%s sets %s=%r, which SamplingParams does not have: ignored", source, key, data[key])
            continue
        defaults[name] = data[key]
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"generation_config: {source} holds a bad sampling default: {e}") from e
    return defaults


def load_generation_defaults(config: EngineConfig, model_path: str | None) -> dict[str, Any]:
    """SamplingParams field -> default value, as config.generation_config says (see the module doc).
    model_path is the resolved model directory (None for built-in dummy models)."""
    file = generation_config_file(config, model_path)
    if file is None:
        return {}
    return defaults_from_dict(read_generation_file(file), repr(file))


def log_generation_defaults(config: EngineConfig, defaults: dict[str, Any]) -> None:
    """One INFO line naming the defaults in force, if there are any."""
    if not defaults:
        return
    source = ("the model's generation_config.json" if config.generation_config == "auto"
              else os.path.join(config.generation_config, FILE_NAME))
    logger.info("Default sampling parameters from %s: %s; pass generation_config='vllm' to ignore them",
                source, defaults)


def default_sampling_params(defaults: dict[str, Any]) -> SamplingParams:
    """A new SamplingParams with the defaults over the neutral ones."""
    return SamplingParams(**defaults)


def apply_defaults(params: SamplingParams, defaults: dict[str, Any], unset: set[str]) -> SamplingParams:
    """params with the defaults of the fields in unset (the fields the caller gave no value);
    the others keep their values. Returns params itself when nothing changes."""
    changes = {name: value for name, value in defaults.items() if name in unset}
    return dataclasses.replace(params, **changes) if changes else params
