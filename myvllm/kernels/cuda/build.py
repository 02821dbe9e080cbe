"""Just-in-time build of the CUDA kernels in this folder as torch custom ops.

`load_cuda_ops()` compiles bindings.cpp and the .cu files with
`torch.utils.cpp_extension.load` into the default torch extensions directory
(`$TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions`) and loads the library into
the process, which registers `torch.ops.myvllm.{rms_norm, fused_add_rms_norm, qk_norm_rope,
qk_norm_rope_store, silu_and_mul, gemv, add_norm_gemv}` for CUDA tensors. The first build
takes about a minute; later processes reuse it (ninja rebuilds only when a source or a flag
changes, e.g. on another GPU arch).

Schemas (outputs new and contiguous, in the inputs' dtype; qk_norm_rope_store also writes
K and V into the caches it is given, float8_e4m3fn ones divided by k_scale / v_scale; what
each accepts: support.py):
    rms_norm(Tensor x, Tensor weight, float eps) -> Tensor
    fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)
    qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps,
                 Tensor positions, Tensor cos_sin_cache) -> (Tensor, Tensor)
    qk_norm_rope_store(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, float eps,
                       Tensor positions, Tensor cos_sin_cache, Tensor(a!) k_cache,
                       Tensor(b!) v_cache, Tensor slot_mapping, Tensor? k_scale=None,
                       Tensor? v_scale=None) -> (Tensor, Tensor)
    silu_and_mul(Tensor x) -> Tensor
    gemv(Tensor x, Tensor weight, Tensor? norm_weight, float eps, bool silu) -> Tensor
    add_norm_gemv(Tensor x, Tensor residual, Tensor weight, Tensor norm_weight, float eps,
                  bool silu) -> (Tensor, Tensor)

Compiler flags: `-O3` and machine code for the present GPU's arch only (one `-gencode`,
which also stops torch from adding its own arch list). No `--use_fast_math`: it would flush
denormals to zero and approximate every division, sqrt and transcendental in every kernel,
silently loosening numerics the tests pin to the reference, for no gain in these
memory-bound kernels. The one place where an approximation pays (silu's exp and division,
on the critical path at decode sizes) uses the intrinsics explicitly; the norms use
`rsqrtf`, which is the same instruction with or without the flag.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EXTENSION_NAME = "myvllm_cuda_ops"
_SOURCES = ("bindings.cpp", "norm.cu", "qk_norm_rope.cu", "activation.cu", "gemv.cu")


def _unavailable_reason() -> str | None:
    """Why the kernels cannot be built here, or None if they can be tried."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def _gencode() -> str:
    """nvcc flag producing machine code for the current GPU only (sm_90 on an H100)."""
    major, minor = torch.cuda.get_device_capability()
    return f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"


def _build_and_load() -> None:
    """Compile (or reuse the cached build) and load the library into this process."""
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    load(
        name=EXTENSION_NAME,
        sources=[str(here / s) for s in _SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", _gencode()],
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def load_cuda_ops() -> bool:
    """Build and load the kernels once per process; True if `torch.ops.myvllm` is usable.

    Returns False, after one INFO log line giving the reason, when there is no CUDA device,
    no nvcc or ninja, or the build fails; it never raises for those. The result is cached:
    a loaded library is process-global, so there is nothing to redo.
    """
    reason = _unavailable_reason()
    if reason is not None:
        logger.info("CUDA kernels not used (%s); falling back to the torch reference ops", reason)
        return False
    try:
        _build_and_load()
        from myvllm.kernels.cuda import fake

        fake.register()  # so that torch.compile can trace the model through the ops
    except Exception as exc:  # noqa: BLE001 - a failed build must never take the engine down
        logger.info("CUDA kernels not used (build failed: %s); falling back to the torch reference ops", exc)
        return False
    logger.info("CUDA kernels loaded (%s)", _gencode().split(",code=")[-1])
    return True
