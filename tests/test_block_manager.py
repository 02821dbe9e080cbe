"""BlockManager: allocation, prefix-cache hits, ref counts, LRU eviction, integrity."""

from __future__ import annotations

import pytest

from myvllm.runtime.block_manager import BlockManager
from myvllm.runtime.sequence import Sequence
from myvllm.sampling_params import SamplingParams

BS = 4


def seq(tokens, seq_id=0) -> Sequence:
    return Sequence(seq_id, str(seq_id), list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int | None = None) -> None:
    """Allocate and 'compute' n more tokens of s (all of them by default)."""
    n = s.num_uncomputed_tokens if n is None else n
    bm.append_slots(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    hits = bm.match_prefix(s)
    bm.admit(s, hits)
    return hits


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS, True)
    s = seq(range(10))
    admit(bm, s)
    compute(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_integrity([s.block_table])
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    bm.check_integrity([])


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(16, BS, True)
    a = seq(range(10), 0)
    admit(bm, a)
    compute(bm, a)
    b = seq(list(range(8)) + [99, 98, 97], 1)
    hits = admit(bm, b)
    assert hits == a.block_table[:2]  # two full shared blocks
    assert b.num_computed_tokens == 8
    compute(bm, b)
    assert bm.ref_counts[hits[0]] == 2
    bm.check_integrity([a.block_table, b.block_table])
    bm.free(a)
    bm.check_integrity([b.block_table])
    assert bm.ref_counts[hits[0]] == 1


def test_last_token_is_never_a_hit():
    bm = BlockManager(16, BS, True)
    a = seq(range(8), 0)
    admit(bm, a)
    compute(bm, a)
    b = seq(range(8), 1)
    assert len(bm.match_prefix(b)) == 1  # 8 tokens = 2 full blocks, but one token must be computed


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(4, BS, True)
    a = seq(range(8), 0)
    admit(bm, a)
    compute(bm, a)
    blocks = list(a.block_table)
    bm.free(a)
    bm.check_integrity([])
    assert len(bm.free_cached) == 2 and bm.num_free_blocks == 4
    again = seq(list(range(8)) + [5], 1)
    assert admit(bm, again) == blocks
    bm.check_integrity([again.block_table])
    bm.free(again)
    # Filling the pool with other tokens evicts the cached blocks, least recently freed first.
    other = seq(range(100, 116), 2)
    admit(bm, other)
    compute(bm, other)
    assert not bm.free_cached and not bm.hash_to_block.keys() - {bm.block_hash[b] for b in other.block_table}
    bm.check_integrity([other.block_table])
    assert bm.match_prefix(seq(list(range(8)) + [5], 3)) == []


def test_no_caching_when_disabled():
    bm = BlockManager(8, BS, False)
    a = seq(range(9), 0)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert not bm.hash_to_block and bm.match_prefix(seq(range(9), 1)) == []
    bm.check_integrity([])


def test_can_admit_counts_hits_that_are_free():
    bm = BlockManager(3, BS, True)
    a = seq(range(8), 0)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    b = seq(list(range(8)) + [1], 1)
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert bm.can_admit(b, hits, 1)  # 2 hits + 1 fresh block = 3 blocks
    assert not bm.can_admit(b, hits, 5)  # would need 2 fresh blocks, only 1 is not a hit


def test_integrity_check_catches_corruption():
    bm = BlockManager(4, BS, True)
    a = seq(range(6), 0)
    admit(bm, a)
    compute(bm, a)
    bm.ref_counts[a.block_table[0]] += 1
    with pytest.raises(AssertionError):
        bm.check_integrity([a.block_table])
    bm.ref_counts[a.block_table[0]] -= 1
    bm.free_empty.append(a.block_table[0])
    with pytest.raises(AssertionError):
        bm.check_integrity([a.block_table])


def test_duplicate_blocks_keep_one_registration():
    bm = BlockManager(8, BS, True)
    a, b = seq(range(8), 0), seq(range(8), 1)
    admit(bm, a)
    admit(bm, b)  # nothing cached yet: both compute the same blocks
    compute(bm, a)
    compute(bm, b)
    bm.check_integrity([a.block_table, b.block_table])
    assert len(bm.hash_to_block) == 2
    bm.free(a)
    bm.free(b)
    bm.check_integrity([])
