"""Architecture name (config.json's "architectures") -> the model class that runs it.

config.SUPPORTED_ARCHITECTURES, which ModelConfig checks, lists the same names.
"""

from __future__ import annotations

from torch import nn

from myvllm.models.qwen3_moe import Qwen3MoeForCausalLM
from myvllm.models.qwen3_opt import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class of a supported architecture (ModelConfig has refused the others)."""
    if architecture not in MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported: choose one of {sorted(MODELS)}")
    return MODELS[architecture]
