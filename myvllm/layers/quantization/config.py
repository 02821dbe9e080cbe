"""The quantization_config of a checkpoint's config.json, read and checked once.

Block-FP8 is the one format supported, as Qwen publishes it (`Qwen/Qwen3-*-FP8`):

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}

Every linear layer of the decoder then stores `weight` as float8_e4m3fn [N, K] and
`weight_scale_inv` [ceil(N / 128), ceil(K / 128)] (the dequantized weight is weight * scale of
its block); activations are quantized per token and group of 128 features at run time. Modules
named in `modules_to_not_convert` (vLLM also reads `ignored_layers`) keep their unquantized
weights. The embeddings and the LM head are never quantized.

This module imports nothing else from `myvllm`, so that myvllm.config can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATION_METHODS = ("fp8",)  # what EngineConfig.quantization and quant_method accept
FP8_FORMATS = ("e4m3",)
ACTIVATION_SCHEMES = ("dynamic",)
WEIGHT_BLOCK_SIZES = ((128, 128),)


def _field(name: str) -> str:
    return f"quantization_config.{name}"


@dataclass(frozen=True)
class Fp8Config:
    """Block-FP8 weights (e4m3, one scale per block_n x block_k block), dynamic activation scales."""

    weight_block_size: tuple[int, int] = (128, 128)  # (block_n over output rows, block_k over input columns)
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if tuple(self.weight_block_size) not in WEIGHT_BLOCK_SIZES:
            raise ValueError(f"{_field('weight_block_size')}={list(self.weight_block_size)} is not supported: "
                             f"choose one of {[list(b) for b in WEIGHT_BLOCK_SIZES]}")

    @property
    def block_n(self) -> int:
        return self.weight_block_size[0]

    @property
    def block_k(self) -> int:
        return self.weight_block_size[1]

    @classmethod
    def from_hf(cls, qc) -> Fp8Config:
        """Read a checkpoint's quantization_config (a dict); ValueError names the field that is not supported."""
        if not isinstance(qc, dict):
            qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
        if not isinstance(qc, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(qc).__name__} {qc!r}")
        method = qc.get("quant_method")
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"{_field('quant_method')}={method!r} is not supported: choose one of "
                             f"{list(QUANTIZATION_METHODS)}")
        fmt = qc.get("fmt", "e4m3")
        if fmt not in FP8_FORMATS:
            raise ValueError(f"{_field('fmt')}={fmt!r} is not supported: choose one of {list(FP8_FORMATS)}")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"{_field('activation_scheme')}={scheme!r} is not supported: choose one of "
                             f"{list(ACTIVATION_SCHEMES)} (scales computed per token group at run time)")
        block = qc.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
            raise ValueError(f"{_field('weight_block_size')}={block!r} is not supported: block-FP8 needs "
                             f"[block_n, block_k], one of {[list(b) for b in WEIGHT_BLOCK_SIZES]} "
                             f"(per-tensor FP8 is not supported)")
        skipped = []
        for key in ("modules_to_not_convert", "ignored_layers"):
            names = qc.get(key) or []
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{_field(key)}={names!r} must be a list of module names")
            skipped.extend(names)
        return cls(weight_block_size=(block[0], block[1]), modules_to_not_convert=tuple(skipped))

    def is_skipped(self, module_name: str) -> bool:
        """Whether module_name (a checkpoint module path, e.g. 'model.layers.0.mlp.down_proj') keeps
        its unquantized weight: an entry of modules_to_not_convert names it, or a module above it,
        or (without a dot path) every module of that name."""
        dotted = f".{module_name}."
        return any(f".{entry.strip('.')}." in dotted for entry in self.modules_to_not_convert)


def quantization_name(config: Fp8Config | None) -> str | None:
    """The quant_method a config stands for (None: unquantized)."""
    return None if config is None else "fp8"
