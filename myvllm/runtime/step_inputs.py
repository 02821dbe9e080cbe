"""ScheduledBatch -> the flat arrays one forward step needs, built with numpy on the host.

For B sequences with n_b new tokens each (T = sum n_b):
    input_ids, positions, slot_mapping   [T]
    seq_lens                             [B]      cached + new
    query_start_loc                      [B + 1]  cumulative n_b
    block_tables                         [B, W]   W = longest table (0-padded: a valid
                                                  block, never read past seq_len)
    logits_indices                       [N]      last token of each sampling sequence
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from myvllm.attention.backend import AttentionMetadata
from myvllm.runtime.host_copy import host_to_device
from myvllm.runtime.scheduler import ScheduledBatch


@dataclass
class PromptLogprobRows:
    """The token rows of a step whose next token is a prompt token with prompt_logprobs asked for."""

    rows: np.ndarray  # int64 [M]: token rows of the step
    targets: np.ndarray  # int64 [M]: the prompt token each row predicts
    owners: list[int]  # [M]: the batch row (sequence) of each
    k: int  # the most top logprobs a row asks for


def prompt_logprob_rows(batch: ScheduledBatch, query_start_loc: np.ndarray) -> PromptLogprobRows | None:
    """Rows whose logits predict a prompt token not yet given a logprob: position p of a chunk
    predicts token p + 1, for p + 1 < the prompt length (the last prompt position predicts the
    first output token, which is sampled)."""
    rows, targets, owners = [], [], []
    for i, (s, c, n) in enumerate(zip(batch.seqs, batch.num_computed_tokens, batch.num_new_tokens)):
        if s.prompt_logprobs is None:
            continue
        first, end = max(c, len(s.prompt_logprobs) - 1), min(c + n, s.num_prompt_tokens - 1)
        for p in range(first, end):
            rows.append(int(query_start_loc[i]) + p - c)
            targets.append(s.token_ids[p + 1])
            owners.append(i)
    if not rows:
        return None
    k = max(batch.seqs[i].params.prompt_logprobs for i in set(owners))
    return PromptLogprobRows(np.asarray(rows, dtype=np.int64), np.asarray(targets, dtype=np.int64), owners, k)


@dataclass
class StepInputs:
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    seq_lens: np.ndarray  # int32 [B]
    query_start_loc: np.ndarray  # int32 [B + 1]
    block_tables: np.ndarray  # int32 [B, W]
    logits_indices: np.ndarray  # int64 [N]
    sample_rows: list[int]  # batch rows that sample, in logits order
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool
    prompt_logprobs: PromptLogprobRows | None = None  # prompt tokens whose logprobs are asked for

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) as device tensors."""

        def put(a: np.ndarray) -> torch.Tensor:
            return host_to_device(a, device)

        meta = AttentionMetadata(
            slot_mapping=put(self.slot_mapping),
            block_tables=put(self.block_tables),
            seq_lens=put(self.seq_lens),
            query_start_loc=put(self.query_start_loc),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            logits_indices=put(self.logits_indices),
            is_decode_only=self.is_decode_only,
        )
        return put(self.input_ids), put(self.positions), meta


def block_table_array(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """Ragged block tables -> [B, width] int32, zero-padded."""
    width = max((len(t) for t in tables), default=0) if width is None else width
    out = np.zeros((len(tables), max(width, 1)), dtype=np.int32)
    for i, table in enumerate(tables):
        out[i, :len(table)] = table
    return out


def build_step_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
    seqs = batch.seqs
    num_seqs = len(seqs)
    new = np.asarray(batch.num_new_tokens, dtype=np.int64)
    computed = np.asarray(batch.num_computed_tokens, dtype=np.int64)
    seq_lens = computed + new
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(new, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    if batch.is_decode_only:
        input_ids = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=num_seqs)
        positions = computed
        token_rows = np.arange(num_seqs)
    else:
        chunks = (s.token_ids[c:c + n] for s, c, n in zip(seqs, batch.num_computed_tokens, batch.num_new_tokens))
        input_ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=num_tokens)
        token_rows = np.repeat(np.arange(num_seqs), new)
        # token j of row b sits at computed[b] + (j - query_start_loc[b])
        positions = np.arange(num_tokens) + np.repeat(computed - query_start_loc[:-1], new)

    block_tables = block_table_array([s.block_table for s in seqs])
    slot_mapping = block_tables[token_rows, positions // block_size].astype(np.int64) * block_size
    slot_mapping += positions % block_size

    sample_rows = np.asarray(batch.sample_rows, dtype=np.int64)
    logits_indices = query_start_loc[1:][sample_rows] - 1
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        seq_lens=seq_lens.astype(np.int32),
        query_start_loc=query_start_loc.astype(np.int32),
        block_tables=block_tables,
        logits_indices=logits_indices,
        sample_rows=sample_rows.tolist(),
        prompt_logprobs=None if batch.is_decode_only else prompt_logprob_rows(batch, query_start_loc),
        max_query_len=int(new.max()),
        max_seq_len=int(seq_lens.max()),
        is_decode_only=batch.is_decode_only,
    )


def multi_pass_arrays(inputs: StepInputs, num_passes: int, passes_kept: np.ndarray,
                      block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pass positions, slots [K, B] int64 and seq_lens [K, B] int32 of a decode batch of K
    passes whose first pass is `inputs`; sequence b keeps passes_kept[b] passes, and later passes
    repeat its last valid position with slot -1 (write nothing)."""
    b = inputs.num_tokens
    offset = np.minimum(np.arange(num_passes)[:, None], passes_kept[None, :] - 1)
    positions = inputs.positions[None, :] + offset
    seq_lens = (inputs.seq_lens[None, :] + offset).astype(np.int32)
    rows = np.broadcast_to(np.arange(b), positions.shape)
    slots = inputs.block_tables[rows, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size
    slots[np.arange(num_passes)[:, None] >= passes_kept[None, :]] = -1
    return positions, slots, seq_lens
