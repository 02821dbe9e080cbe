"""Engine and model configuration.

`EngineConfig` holds what the user asked for; it is frozen and validated once at
construction. `ModelConfig` is what the checkpoint says, read through
`transformers.AutoConfig` (or a built-in shape set for `dummy:` models).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from myvllm.kernels.reference import FP8_KV_DTYPE
from myvllm.layers.quantization.config import QUANTIZATION_METHODS, Fp8Config

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# model_type of a config.json without "architectures" -> the architecture it means
ARCHITECTURE_OF_MODEL_TYPE = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
LOAD_FORMATS = ("auto", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
# kv_cache_dtype: "auto" stores K/V in the model's dtype; vLLM's fp8 names store float8 e4m3
# (value / scale, per layer and KV head), halving the cache's bytes per token.
KV_CACHE_DTYPES = {"auto": None, "fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}
FP8_MIN_CAPABILITY = (8, 9)  # the first GPUs with float8 conversions (Ada, Hopper)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
DUMMY_PREFIX = "dummy:"

# Shapes of the published Qwen3 dense and MoE checkpoints, for load_format="dummy" without files.
BUILTIN_SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    # The MoE checkpoints: every layer sparse (mlp_only_layers empty, decoder_sparse_step 1).
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                          architecture="Qwen3MoeForCausalLM", num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True),
    "qwen3-235b-a22b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, tie_word_embeddings=False,
                            architecture="Qwen3MoeForCausalLM", num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=1536, norm_topk_prob=True),
}
BUILTIN_COMMON = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                      torch_dtype="bfloat16")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} is out of range: must be {allowed}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported: choose one of {list(choices)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cuda', 'cuda:N', 'cpu' or None (the current CUDA device if there is one, else CPU)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(
            f"device={device!r}: CUDA device index must be in [0, {torch.cuda.device_count() - 1}]"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM(model, **engine_args)` accepts. Validated at construction."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 256
    enable_prefix_caching: bool = True
    # No CUDA graphs and no torch.compile.
    enforce_eager: bool = False
    # 0: the model runs eagerly; 1: its forward runs through torch.compile (runtime/compilation.py),
    # inside the decode CUDA graphs too. Off under enforce_eager.
    compilation_level: int = 0
    load_format: str = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False
    attention_backend: str = "auto"
    # "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (float8 e4m3 with a scale per layer and KV head:
    # 1.0, the checkpoint's k_scale / v_scale, or measured at start-up when calculate_kv_scales).
    kv_cache_dtype: str = "auto"
    # Measure the fp8 KV scales from a calibration forward at start-up instead of reading them.
    calculate_kv_scales: bool = False
    # KV pool size on CPU, where there is no device memory to measure.
    cpu_kv_cache_gib: float = 1.0
    # Fixes the number of KV blocks (tests use it to force a tiny pool).
    num_kv_blocks: int | None = None
    cuda_graph_max_batch_size: int = 512
    # A decode-only batch runs up to this many forward passes (the inputs of pass k+1 are the
    # tokens sampled in pass k, on the device), amortising host work over them.
    num_decode_passes: int = 8
    # Schedule the next decode batch while the previous one runs on the device, so that the
    # host's work between batches overlaps the device's.
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    max_logprobs: int = 20
    # The most completions one request may ask for (SamplingParams.n).
    max_n: int = 256
    # Fused CUDA kernels built with nvcc at first use; off falls back to torch ops.
    use_cuda_kernels: bool = True
    revision: str | None = None
    download_dir: str | None = None
    # Default sampling parameters: "auto" reads the model's generation_config.json, "vllm" keeps
    # the neutral SamplingParams defaults, any other value is a folder holding generation_config.json.
    generation_config: str = "auto"
    # Weight quantization: None reads the checkpoint's quantization_config; "fp8" must match it,
    # and with load_format="dummy" builds block-FP8 weights of random values.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise TypeError(f"model must be a non-empty path or hub id, got {self.model!r}")
        object.__setattr__(self, "model", str(self.model))
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, os.PathLike)):
            raise TypeError(f"tokenizer must be a path or hub id, got {self.tokenizer!r}")
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        _check_choice("dtype", self.dtype, ("auto", *DTYPES))
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_model_len", self.max_model_len, 2)
        gmu = self.gpu_memory_utilization
        if isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1:
            raise ValueError(f"gpu_memory_utilization={gmu!r} is out of range: must be in (0, 1]")
        _check_int("kvcache_block_size", self.kvcache_block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        if not _is_power_of_two(self.kvcache_block_size):
            raise ValueError(
                f"kvcache_block_size={self.kvcache_block_size} must be a power of two in "
                f"[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"
            )
        for name in ("enable_prefix_caching", "enforce_eager", "skip_tokenizer_init", "use_cuda_kernels",
                     "async_scheduling", "calculate_kv_scales"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("quantization", self.quantization, (None, *QUANTIZATION_METHODS))
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.calculate_kv_scales and KV_CACHE_DTYPES[self.kv_cache_dtype] is None:
            raise ValueError(f"calculate_kv_scales=True needs an fp8 KV cache, but kv_cache_dtype="
                             f"{self.kv_cache_dtype!r}: use kv_cache_dtype='fp8'")
        _check_int("seed", self.seed, 0)
        ckv = self.cpu_kv_cache_gib
        if isinstance(ckv, bool) or not isinstance(ckv, (int, float)) or not ckv > 0:
            raise ValueError(f"cpu_kv_cache_gib={ckv!r} is out of range: must be > 0")
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)
        _check_int("cuda_graph_max_batch_size", self.cuda_graph_max_batch_size, 1)
        _check_int("num_decode_passes", self.num_decode_passes, 1)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("compilation_level", self.compilation_level, 0, 1)
        if self.compiles and self.tensor_parallel_size > 1:
            raise ValueError(f"compilation_level={self.compilation_level} is not supported with "
                             f"tensor_parallel_size={self.tensor_parallel_size}: use compilation_level=0")
        _check_int("max_logprobs", self.max_logprobs, 0)
        _check_int("max_n", self.max_n, 1)
        self._check_generation_config()
        device = resolve_device(self.device)
        object.__setattr__(self, "device", str(device))
        if KV_CACHE_DTYPES[self.kv_cache_dtype] is not None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < FP8_MIN_CAPABILITY:
                raise ValueError(
                    f"kv_cache_dtype={self.kv_cache_dtype!r} needs a GPU of compute capability "
                    f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} or later, but {device} has "
                    f"{'.'.join(map(str, capability))}: use kv_cache_dtype='auto'"
                )
        tp = self.tensor_parallel_size
        if device.type == "cuda" and device.index + tp > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={tp} needs GPUs cuda:{device.index}..cuda:{device.index + tp - 1} "
                f"(one per rank), but only {torch.cuda.device_count()} are visible"
            )

    def _check_generation_config(self) -> None:
        """'auto', 'vllm' or a folder path (a PathLike becomes its str); the folder is read at engine start."""
        value = self.generation_config
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"generation_config must be 'auto', 'vllm' or a folder path, got "
                            f"{type(value).__name__} {value!r}")
        if not value:
            raise ValueError("generation_config='' is not supported: choose 'auto', 'vllm' or a folder path")
        object.__setattr__(self, "generation_config", value)

    def rank_device(self, rank: int) -> torch.device:
        """The device of tensor-parallel rank `rank`: the configured GPU offset by the rank (CPU for all)."""
        device = self.torch_device
        return device if device.type == "cpu" else torch.device("cuda", device.index + rank)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Build from keyword arguments; unknown names raise TypeError listing them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s) {unknown}; accepted: {sorted(names - {'model'})}"
            )
        return cls(model=model, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def compiles(self) -> bool:
        """Whether the model's forward runs through torch.compile."""
        return self.compilation_level >= 1 and not self.enforce_eager

    @property
    def is_dummy_model(self) -> bool:
        return self.model.startswith(DUMMY_PREFIX)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "Qwen3ForCausalLM"
    quantization: Fp8Config | None = None  # the checkpoint's quantization_config (None: unquantized)
    # Mixture of experts (Qwen3MoeForCausalLM; num_experts 0 for a dense model). Layer i is sparse
    # when num_experts > 0, i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    # (transformers' rule); the other layers have a dense MLP of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.num_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        _check_int("num_experts", self.num_experts, 1)
        _check_int("num_experts_per_tok", self.num_experts_per_tok, 1, self.num_experts)
        _check_int("moe_intermediate_size", self.moe_intermediate_size, 1)
        _check_int("decoder_sparse_step", self.decoder_sparse_step, 1)
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers={list(self.mlp_only_layers)}: layer(s) {bad} are out of range: "
                             f"must be in [0, {self.num_hidden_layers - 1}]")

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the experts (else a dense MLP)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, path: str) -> ModelConfig:
        """Read config.json of a local checkpoint directory (no remote code ever runs)."""
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read a model config from {path!r}: {e}") from e
        return cls.from_hf_config(hf_config)

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelConfig:
        archs = list(getattr(hf_config, "architectures", None) or [])
        model_type = getattr(hf_config, "model_type", None)
        if not archs and model_type in ARCHITECTURE_OF_MODEL_TYPE:
            archs = [ARCHITECTURE_OF_MODEL_TYPE[model_type]]
        supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ValueError(
                f"architecture {archs or model_type!r} is not supported: this engine runs "
                f"{list(SUPPORTED_ARCHITECTURES)} (the Qwen3 dense and MoE families)"
            )
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported: only the default rotary is")
        rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, torch.float32)
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        qc = getattr(hf_config, "quantization_config", None)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            torch_dtype=dtype,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            architecture=supported[0],
            quantization=None if qc is None else Fp8Config.from_hf(qc),
            **(cls._moe_fields(hf_config) if supported[0] == "Qwen3MoeForCausalLM" else {}),
        )

    @staticmethod
    def _moe_fields(hf_config) -> dict:
        """The MoE fields of a transformers Qwen3MoeConfig."""
        return dict(
            num_experts=hf_config.num_experts,
            num_experts_per_tok=hf_config.num_experts_per_tok,
            moe_intermediate_size=hf_config.moe_intermediate_size,
            norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
            decoder_sparse_step=getattr(hf_config, "decoder_sparse_step", 1),
            mlp_only_layers=tuple(getattr(hf_config, "mlp_only_layers", None) or ()),
        )

    @classmethod
    def builtin(cls, name: str) -> ModelConfig:
        """A built-in Qwen3 shape set, e.g. 'qwen3-0.6b' or 'qwen3-30b-a3b'."""
        key = name.lower().removeprefix(DUMMY_PREFIX)
        if key not in BUILTIN_SHAPES:
            raise ValueError(f"unknown built-in model {name!r}: choose one of {sorted(BUILTIN_SHAPES)}")
        values = {**BUILTIN_COMMON, **BUILTIN_SHAPES[key]}
        eos = values.pop("eos_token_id")
        values["torch_dtype"] = DTYPES[values["torch_dtype"]]
        return cls(**values, eos_token_ids=(eos,))

    def with_quantization(self, quantization: str | None, load_format: str) -> ModelConfig:
        """This config under the engine argument `quantization`: None keeps the checkpoint's;
        "fp8" must be the checkpoint's, except with load_format="dummy" (random weights), where it
        gives an unquantized config block-FP8 with 128 x 128 blocks."""
        if quantization is None or self.quantization is not None:
            return self
        if load_format != "dummy":
            raise ValueError(f"quantization={quantization!r}, but the checkpoint has no quantization_config: "
                             f"pass quantization=None for its unquantized weights (quantizing a checkpoint "
                             f"at load time is not supported), or load_format='dummy' for random FP8 weights")
        return dataclasses.replace(self, quantization=Fp8Config())

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ValueError unless the layers split evenly over tp_size ranks: attention heads
        and the MLP's (and experts') intermediate size divide by it, and KV heads divide by it or into it
        (then each KV head is replicated on tp_size / num_key_value_heads ranks). The
        vocabulary needs no check: each rank's share is padded."""
        if tp_size == 1:
            return
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide num_attention_heads={heads}: "
                f"use a tensor_parallel_size that divides {heads}"
            )
        if kv_heads % tp_size and tp_size % kv_heads:
            raise ValueError(
                f"tensor_parallel_size={tp_size} and num_key_value_heads={kv_heads}: one must divide the "
                f"other (KV heads are split over ranks, or replicated when there are fewer of them)"
            )
        sparse = [self.is_sparse_layer(i) for i in range(self.num_hidden_layers)]
        if not all(sparse) and self.intermediate_size % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide intermediate_size={self.intermediate_size}"
            )
        if any(sparse) and self.moe_intermediate_size % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide moe_intermediate_size={self.moe_intermediate_size} "
                f"(each rank holds a slice of every expert's intermediate dimension)"
            )

    def resolve_dtype(self, dtype: str) -> torch.dtype:
        return self.torch_dtype if dtype == "auto" else DTYPES[dtype]

    @staticmethod
    def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache stores for EngineConfig.kv_cache_dtype ("auto": the model's)."""
        return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype

    def kv_bytes_per_token(self, dtype: torch.dtype, tp_size: int = 1) -> int:
        kv_heads = max(1, self.num_key_value_heads // tp_size)
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * kv_heads * self.head_dim * elem
