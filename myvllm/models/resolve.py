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
# A tokenizer from the hub needs no weights.
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja"]
# Any one of these file sets lets transformers build a real tokenizer; without all of them it
# builds an empty one that turns every text into no tokens.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer_config.json",), ("vocab.json", "merges.txt"),
                       ("tokenizer.model",))
# Directory names download_model.py gives the published Qwen3 dense checkpoints (./huggingface/<name>).
PUBLISHED_QWEN3 = re.compile(r"^Qwen3-(0\.6|1\.7|4|8|14|32)B(-Base)?$")
DOWNLOAD_PARENT = "huggingface"
NO_TOKENIZER_FIX = ("pass tokenizer=<a directory or hub id with tokenizer files>, or skip_tokenizer_init=True "
                    "for token-id prompts only")


@dataclass(frozen=True)
class ResolvedModel:
    path: str | None  # local directory, None for built-in dummy shapes
    model_config: ModelConfig


def download_hint(repo: str) -> str:
    return f"download it with: python download_model.py --repo {repo}"


def missing_dir_hint(path: str) -> str:
    """What to do about a local path that does not exist: download it if it names a published
    Qwen3 checkpoint (the layout download_model.py writes), else nothing to suggest."""
    parent, name = os.path.split(os.path.normpath(path))
    if not PUBLISHED_QWEN3.match(name):
        return "no such directory"
    dir_arg = "" if os.path.normpath(parent or ".") == DOWNLOAD_PARENT else f" --dir {parent or '.'}"
    return f"no such directory; {download_hint('Qwen/' + name)}{dir_arg}"


def resolve_path(value: str, what: str = "model", revision: str | None = None, cache_dir: str | None = None,
                 allow_patterns: list[str] = CHECKPOINT_PATTERNS) -> str:
    """A local directory for value (the `what` argument: model or tokenizer): itself if it is one,
    else a hub snapshot."""
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise ValueError(f"{what}={value!r} is a file, not a directory: pass the directory that holds it")
    if not HUB_ID.match(value):
        raise ValueError(f"{what}={value!r} is neither a local directory nor a hub id (owner/name): "
                         f"{missing_dir_hint(value)}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(value, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
    except Exception as e:  # offline with no cache, unknown repo, network down: all say the same to the user
        raise ValueError(f"{what}={value!r} is not a local directory and cannot be got from the Hugging Face hub "
                         f"({type(e).__name__}: {e}); {download_hint(value)}") from e


def resolve_model(config: EngineConfig) -> ResolvedModel:
    if config.is_dummy_model:
        if config.load_format != "dummy":
            raise ValueError(f"model {config.model!r} has no weights: use load_format='dummy'")
        model_config = ModelConfig.builtin(config.model.removeprefix(DUMMY_PREFIX))
        return ResolvedModel(None, model_config.with_quantization(config.quantization, config.load_format))
    path = resolve_path(config.model, "model", config.revision, config.download_dir)
    model_config = ModelConfig.from_hf(path).with_quantization(config.quantization, config.load_format)
    return ResolvedModel(path, model_config)


def has_tokenizer_files(path: str) -> bool:
    return any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in TOKENIZER_FILE_SETS)


def tokenizer_source(config: EngineConfig, resolved: ResolvedModel) -> tuple[str, str]:
    """(which argument it comes from, local directory) of the tokenizer to load."""
    if config.tokenizer is None:
        if resolved.path is None:
            raise ValueError(f"model {config.model!r} has no tokenizer files: {NO_TOKENIZER_FIX}")
        return "model", resolved.path
    tokenizer = os.fspath(config.tokenizer)
    # The model's revision names a commit of the model's repository, not of another one.
    revision = config.revision if tokenizer == config.model else None
    return "tokenizer", resolve_path(tokenizer, "tokenizer", revision, config.download_dir, TOKENIZER_PATTERNS)


def is_empty_vocab(tokenizer) -> bool:
    """True when the vocabulary holds nothing but added (special) tokens."""
    return len(tokenizer.get_vocab()) <= len(tokenizer.get_added_vocab())


def load_tokenizer(config: EngineConfig, resolved: ResolvedModel):
    """The Hugging Face tokenizer of config.tokenizer, else of the model directory."""
    from transformers import AutoTokenizer

    what, path = tokenizer_source(config, resolved)
    if not has_tokenizer_files(path):
        names = ", ".join(" + ".join(files) for files in TOKENIZER_FILE_SETS)
        raise ValueError(f"{what} directory {path!r} has no tokenizer files (none of: {names}): {NO_TOKENIZER_FIX}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {what} directory {path!r}: {e}") from e
    if is_empty_vocab(tokenizer):
        raise ValueError(f"the tokenizer of {what} directory {path!r} has an empty vocabulary: {NO_TOKENIZER_FIX}")
    return tokenizer


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
