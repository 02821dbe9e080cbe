"""Decode steps captured into CUDA graphs, one per batch-size bucket.

At engine start, the decode forward (embedding -> decoder layers; with compilation_level=1 the
compiled one, runtime/compilation.py) is captured for each bucket size, largest first, all
graphs sharing one memory pool.
Inputs live in static device buffers that every graph reads:

    input_ids, positions, slot_mapping   [max_bs]
    seq_lens                             [max_bs]
    block_tables                         [max_bs, max_blocks_per_seq]
    query_start_loc = arange(max_bs + 1), logits_indices = arange(max_bs) (fixed)

A decode step with B sequences is padded here to the smallest bucket P >= B; rows
B..P-1 get slot -1 (write nothing) and seq_len 0 (attend to nothing) and are dropped.
Above the largest bucket the step runs eager. Host values go through pinned staging
buffers, one copy per buffer. The final norm and the LM head run after the replay, on
the B real rows only.
"""

from __future__ import annotations

import bisect
import logging
import math
import time

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.runtime.compilation import Forward
from myvllm.runtime.step_inputs import StepInputs

logger = logging.getLogger(__name__)

SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16
WARMUP_RUNS = 2


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every SIZE_STEP, and always max_batch_size itself."""
    sizes = {s for s in SMALL_SIZES if s <= max_batch_size}
    sizes.update(range(SIZE_STEP, max_batch_size + 1, SIZE_STEP))
    sizes.add(max_batch_size)
    return sorted(sizes)


def padded_size(batch_size: int, sizes: list[int]) -> int | None:
    """Smallest size in the sorted list holding batch_size; None above them."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


class GraphRunner:
    """The decode CUDA graphs of one model: capture, padding, replay."""

    def __init__(self, model: nn.Module, forward: Forward, backend: AttentionBackend, device: torch.device,
                 max_batch_size: int, max_model_len: int, block_size: int) -> None:
        self.model = model  # logits(hidden, residual) runs after the replay
        self.forward = forward  # (input_ids, positions, meta) -> (hidden, residual): the model, or it compiled
        self.backend = backend
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.max_blocks = math.ceil(max_model_len / block_size)
        n, dev = self.max_batch_size, self.device
        # rows: input_ids, positions, slot_mapping
        self.tokens = torch.zeros(3, n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self.tokens[2].fill_(-1)
        pin = dev.type == "cuda"
        # Two sets of pinned staging buffers, used in turn: a window's inputs are staged while
        # the copies of the window before it (launched, still running) may not have run yet.
        self.staging = [
            (torch.zeros(3, n, dtype=torch.int64, pin_memory=pin),
             torch.zeros(n, dtype=torch.int32, pin_memory=pin),
             torch.zeros(n, self.max_blocks, dtype=torch.int32, pin_memory=pin))
            for _ in range(2)
        ]
        self.num_loads = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # bucket -> static (hidden, residual) [bs, hidden] each: the model's output before the final norm
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.capture_time = 0.0

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens[2, :bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[:bs + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            logits_indices=self.logits_indices[:bs],
            is_decode_only=True,
        )

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        meta = self._meta(bs)
        self.backend.prepare(meta)
        return self.forward(self.tokens[0, :bs], self.tokens[1, :bs], meta)

    @torch.inference_mode()
    def capture_all(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self.backend.init_graph_buffers(self.max_batch_size)
        for bs in reversed(self.batch_sizes):
            for _ in range(WARMUP_RUNS):  # compiles and tunes every kernel outside the capture
                self._forward(bs)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.capture_time = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.2f s, using %.2f GiB",
                    len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1], self.capture_time,
                    used / (1 << 30))

    def can_run(self, inputs: StepInputs) -> bool:
        """Whether a captured graph runs this step: decode-only, at most the largest bucket."""
        return inputs.is_decode_only and inputs.num_tokens <= self.max_batch_size

    def load_host(self, inputs: StepInputs) -> None:
        """Stage a decode step's host inputs into the static buffers; padding rows write nothing."""
        b = inputs.num_tokens
        p = padded_size(b, self.batch_sizes)
        width = inputs.block_tables.shape[1]
        host_tokens, host_seq_lens, host_block_tables = self.staging[self.num_loads % 2]
        self.num_loads += 1
        host = host_tokens.numpy()
        host[0, :b] = inputs.input_ids
        host[1, :b] = inputs.positions
        host[2, :b] = inputs.slot_mapping
        host[:2, b:p] = 0
        host[2, b:p] = -1
        lens = host_seq_lens.numpy()
        lens[:b] = inputs.seq_lens
        lens[b:p] = 0
        tables = host_block_tables.numpy()
        tables[:b, :width] = inputs.block_tables
        # whole contiguous ranges: a strided copy would stage through pageable memory
        self.tokens.copy_(host_tokens, non_blocking=True)
        self.seq_lens[:p].copy_(host_seq_lens[:p], non_blocking=True)
        self.block_tables[:b].copy_(host_block_tables[:b], non_blocking=True)

    def load_input_ids(self, rows: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Overwrite the input ids of some rows with values on the device (tokens in flight)."""
        self.tokens[0].index_copy_(0, rows, input_ids)

    def load_device(self, input_ids: torch.Tensor, positions_slots: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Overwrite the first B rows of the token inputs from device tensors (later passes of a
        multi-step batch): input_ids [B], positions_slots [2, B] (positions; slot mapping),
        seq_lens [B]; padding rows and block tables stay as load_host left them."""
        b = input_ids.shape[0]
        self.tokens[0, :b].copy_(input_ids)
        self.tokens[1:3, :b].copy_(positions_slots)
        self.seq_lens[:b].copy_(seq_lens)

    def replay(self, num_seqs: int) -> torch.Tensor:
        """Replay the graph of num_seqs' bucket; logits [num_seqs, vocab] of the real rows."""
        p = padded_size(num_seqs, self.batch_sizes)
        self.backend.prepare_replay(self._meta(p), p)
        self.graphs[p].replay()
        # every sequence of a decode-only step samples: the logits rows are 0..num_seqs-1
        hidden, residual = self.outputs[p]
        return self.model.logits(hidden[:num_seqs], residual[:num_seqs])
