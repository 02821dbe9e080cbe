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
prefill and mixed steps call it directly. The token count is dynamic, and the batch size and
block-table width are unbacked (never specialised), so steps of any size share a few graphs:
one token and more, for each phase the backend tells apart (decode-only or not), plus one for
two tokens with the CUDA kernels (the matrix-vector kernel takes up to two rows). The KV cache's
size is static (`mark_kv_cache_static`): the layers write views of it at offsets that depend
on it, which Inductor does not place correctly when they are symbolic; so the profiling
forward, over a scratch cache, runs eagerly.

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

# Graphs Dynamo may compile for the model's forward in one process: a few per engine (see
# above), for several engines one after another (tests; a restarted LLM). Past the limit a
# recompile would fall back to eager. Compiled graphs are never dropped while the process
# lives: a captured CUDA graph replays their kernels.
RECOMPILE_LIMIT = 64

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

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        _mark_dynamic(input_ids, positions, meta)
        if self._decided:
            return self._compiled(input_ids, positions, meta)
        self.model(input_ids, positions, meta)
        self._decided = True
        start = time.perf_counter()
        out = self._compiled(input_ids, positions, meta)
        logger.info("model forward compiled (first graph) in %.2f s", time.perf_counter() - start)
        return out


def _mark_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    """Tell Dynamo which sizes vary from step to step. The token count is dynamic but backed
    (the model branches on it: the matrix-vector kernel takes up to two rows), so it is
    specialised at 1 and compiled once above that. The batch size and the block-table width
    only reach the attention ops, so they are unbacked: never specialised, no guards on them."""
    for t in (input_ids, positions, meta.slot_mapping):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for t in (meta.seq_lens, meta.query_start_loc, meta.block_tables):
        torch._dynamo.decorators.mark_unbacked(t, 0)
    torch._dynamo.decorators.mark_unbacked(meta.block_tables, 1)
    if isinstance(meta.backend_state, torch.Tensor) and meta.backend_state.dim() > 0:
        torch._dynamo.decorators.mark_unbacked(meta.backend_state, 0)


def mark_kv_cache_static(kv_cache: torch.Tensor) -> None:
    """Keep the KV cache's sizes static in every compiled graph, even after a graph saw a cache of
    another size (a second engine in the process): Dynamo would make them symbolic, and the
    layers' writes to views of the cache at symbolic offsets are misplaced by Inductor."""
    torch._dynamo.mark_static(kv_cache)


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
