"""torch.compile of the model's forward (engine argument `compilation_level=1`).

The forward (embedding -> decoder layers, the model's output before the final norm) is traced
by Dynamo into one graph and compiled by Inductor. Attention is not traced into: every
backend's kernels are custom ops (attention/ops.py), so the graph runs from one attention call
to the next as compiled code and calls the paged-cache kernels as they are (what vLLM's
piecewise compilation does by splitting its graph there). The fused CUDA ops of
`torch.ops.myvllm` are opaque nodes too (their fake versions: kernels/cuda/fake.py); with
`use_cuda_kernels=False` the model's ops are plain torch, and Inductor fuses the norms, rotary
and SiLU itself. bench.py / benchmarks/compile_compare.py compare the two with eager.

Decode-only steps run the compiled forward inside the decode CUDA graphs (capture/graph_runner.py);
prefill and mixed steps call it directly. The token count (and the batch size and block-table
width) are marked dynamic, so steps of any size share a few graphs: one for decode and one for
the other steps, plus the sizes Dynamo treats apart (0, 1, and the matrix-vector kernel's row
limit, a branch in the model).

Compile cache: Inductor keeps its compiled graphs and kernels in `TORCHINDUCTOR_CACHE_DIR`
(default `/tmp/torchinductor_<user>`), so a second start with the same model, shapes and
versions reuses them and only traces again. Point the variable at a persistent directory to
keep the cache across reboots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from myvllm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)

COMPILATION_LEVELS = (0, 1)  # 0: eager; 1: the model's forward through torch.compile (Inductor)
# Distinct graphs one engine may compile (decode and other steps, times the sizes Dynamo
# specialises); above Dynamo's default a recompile would otherwise fall back to eager.
RECOMPILE_LIMIT = 32

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], tuple[torch.Tensor, torch.Tensor]]


class CompiledForward:
    """model(input_ids, positions, meta) -> (hidden, residual), through torch.compile.

    The first call runs the model eagerly first, on the same inputs: the host-side decisions
    the model makes once (which fused kernels take which shapes, logged by FusedOps.supports)
    are made there, outside any trace, and the compiled call then only reads them. That call
    writes the same K/V into the same slots as the eager one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled = torch.compile(model, fullgraph=True)
        self._decided = False
        self.first_compile_s: float | None = None  # wall time of the first compiled call

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        _mark_dynamic(input_ids, positions, meta)
        if self._decided:
            return self._compiled(input_ids, positions, meta)
        self.model(input_ids, positions, meta)
        self._decided = True
        start = time.perf_counter()
        out = self._compiled(input_ids, positions, meta)
        self.first_compile_s = time.perf_counter() - start
        logger.info("model forward compiled (first graph) in %.2f s", self.first_compile_s)
        return out


def _mark_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    """Hint Dynamo that the token count, batch size and block-table width vary (no error if a
    size is specialised anyway)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.query_start_loc, meta.block_tables):
        mark(t, 0)
    mark(meta.block_tables, 1)
    if isinstance(meta.backend_state, torch.Tensor) and meta.backend_state.dim() > 0:
        mark(meta.backend_state, 0)


def model_forward(model: nn.Module, compilation_level: int) -> Forward:
    """The forward the runner and the graph runner call: the model itself, or compiled."""
    if compilation_level == 0:
        return model
    logger.info("compiling the model forward with torch.compile (Inductor); compile cache: %s",
                _cache_dir())
    return CompiledForward(model)


def _cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()
