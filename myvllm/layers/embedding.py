"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding
zeroes ids outside its slice and all-reduces; the LM head computes its slice of
the logits for the rows being sampled only, with the final norm as its prologue,
and gathers the slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from myvllm.distributed.parallel_state import SINGLE, TensorParallelGroup
from myvllm.layers.norm import NormPrologue
from myvllm.models.weight_utils import Loaded, copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)  # padded so every rank holds the same count
        self.start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shape mismatch: checkpoint has {tuple(loaded.shape)}, the model expects "
                f"({self.vocab_size}, {param.shape[1]})"
            )
        start = min(self.start, self.vocab_size)
        rows = min(self.shard_size, self.vocab_size - start)  # the last ranks hold padding rows
        if rows < self.shard_size:
            param.data.zero_()
        part = loaded if rows == self.vocab_size else loaded.narrow(0, start, rows)
        copy_checked(param.data[:rows], part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The vocabulary-parallel output projection; its weight may be tied to the embedding's."""

    def __init__(self, vocab_size: int, hidden_size: int, ops, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.ops = ops  # kernels.fused_ops.FusedOps

    def forward(self, x: NormPrologue) -> torch.Tensor:
        """The final norm's operands for the rows to sample [N, hidden] -> logits [N, vocab]."""
        logits, _ = x.project(self.weight, self.ops)  # this rank's [N, shard_size]
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        return logits[:, :self.vocab_size] if logits.shape[-1] != self.vocab_size else logits
