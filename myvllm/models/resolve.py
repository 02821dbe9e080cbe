"""Where a model comes from: a local directory, a Hugging Face hub id, or built-in shapes.

`model` may be
  - a local checkpoint directory (config.json, *.safetensors, tokenizer files);
  - a hub id such as "Qwen/Qwen3-0.6B", resolved through huggingface_hub's cache
    (HF_HUB_OFFLINE=1 keeps it to the cache);
  - "dummy:qwen3-0.6b" (or another built-in name): no files, random weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from myvllm.config import DUMMY_PREFIX, EngineConfig, ModelConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "merges.txt", "vocab.json"]


@dataclass(frozen=True)
class ResolvedModel:
    path: str | None  # local directory, None for built-in dummy shapes
    model_config: ModelConfig


def download_hint(model: str) -> str:
    repo = model if HUB_ID.match(model) else "Qwen/Qwen3-0.6B"
    return f"download it with: python download_model.py --repo {repo}"


def resolve_path(model: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory for model: itself if it is one, else a hub snapshot."""
    if os.path.isdir(model):
        return model
    if not HUB_ID.match(model):
        raise ValueError(f"model {model!r} is neither a local directory nor a hub id (owner/name); "
                         f"{download_hint(model)}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_PATTERNS)
    except Exception as e:  # offline with no cache, unknown repo, network down: all say the same to the user
        raise ValueError(f"cannot get model {model!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                         f"{download_hint(model)}") from e


def resolve_model(config: EngineConfig) -> ResolvedModel:
    if config.is_dummy_model:
        if config.load_format != "dummy":
            raise ValueError(f"model {config.model!r} has no weights: use load_format='dummy'")
        return ResolvedModel(None, ModelConfig.builtin(config.model.removeprefix(DUMMY_PREFIX)))
    path = resolve_path(config.model, config.revision, config.download_dir)
    return ResolvedModel(path, ModelConfig.from_hf(path))


def load_tokenizer(config: EngineConfig, resolved: ResolvedModel):
    """The Hugging Face tokenizer of config.tokenizer, else of the model directory."""
    from transformers import AutoTokenizer

    source = config.tokenizer
    if source is None:
        if resolved.path is None:
            raise ValueError(f"model {config.model!r} has no tokenizer files: pass tokenizer=... "
                             f"or skip_tokenizer_init=True")
        source = resolved.path
    elif not os.path.isdir(source):
        source = resolve_path(source, config.revision, config.download_dir)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {source!r}: {e}") from e


def load_generation_eos(path: str) -> set[int]:
    """EOS ids listed in generation_config.json, if the checkpoint has one."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return set()
    with open(file) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}
