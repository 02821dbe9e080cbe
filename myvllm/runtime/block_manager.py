"""Paged KV blocks with a hash-chain prefix cache.

Every block is in exactly one of three states:

    referenced      ref_count > 0, held by the block tables of live sequences
    free, cached    ref_count == 0, holds the K/V of a hashed full block; reusable
                    by a prefix-cache hit until evicted (least recently freed first)
    free, empty     ref_count == 0, no hash

    allocate:  take free-empty first, then evict the LRU free-cached block
    hit:       a hashed block is referenced again (from any state but free-empty)
    free:      ref_count -> 0 moves a block to free-cached (if hashed) or free-empty

A full block's hash covers its tokens and the hash of the block before it (a
chain), so equal hashes mean equal prefixes. `check_integrity()` verifies these
invariants; tests call it after every step.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np

from myvllm.runtime.sequence import Sequence

ROOT_HASH = b""


def block_digest(parent: bytes, token_ids: list[int]) -> bytes:
    """Chain hash of one full block: 128-bit blake2b over the parent hash and the tokens."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_empty: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.num_hits = 0  # prefix-cache hit tokens, for stats
        self.num_queries = 0  # tokens of the sequences admitted (looked up in the prefix cache), for stats

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_empty) + len(self.free_cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to seq's table so it covers its computed plus num_new_tokens tokens."""
        needed = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def _seq_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain hashes of seq's first num_blocks full blocks (computed once, then kept)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_digest(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq (which holds no blocks yet).

        At least one token is always left to compute: its logits are needed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(seq) - 1) // self.block_size
        matched = []
        for digest in self._seq_block_hashes(seq, max_blocks):
            block_id = self.hash_to_block.get(digest)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def can_admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting seq with these prefix hits can get blocks for num_new_tokens more."""
        needed = self.blocks_for_tokens(len(cached_blocks) * self.block_size + num_new_tokens)
        fresh = needed - len(cached_blocks)
        hits_now_free = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return fresh <= self.num_free_blocks - hits_now_free

    # ---- mutations -----------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if self.free_empty:
            return self.free_empty.popleft()
        block_id, _ = self.free_cached.popitem(last=False)  # evict least recently freed
        digest = self.block_hash[block_id]
        del self.hash_to_block[digest]
        self.block_hash[block_id] = None
        return block_id

    def admit(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Give a waiting seq its prefix-cache hits; its computed tokens start after them."""
        assert not seq.block_table, f"{seq} already holds blocks"
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_cached[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        seq.num_hashed_blocks = len(cached_blocks)
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        self.num_hits += seq.num_computed_tokens
        self.num_queries += len(seq)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover num_new_tokens more tokens. Caller checked room."""
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {n}, have {self.num_free_blocks}")
        for _ in range(n):
            block_id = self._take_free_block()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; the last blocks go first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"double free of block {block_id}"
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is not None:
                    self.free_cached[block_id] = None
                else:
                    self.free_empty.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        # computed tokens still in flight have no values on the host yet: they wait
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        hashes = self._seq_block_hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            block_id = seq.block_table[i]
            digest = hashes[i]
            # Another sequence may have computed the same block first: keep that one.
            if digest not in self.hash_to_block and self.block_hash[block_id] is None:
                self.hash_to_block[digest] = block_id
                self.block_hash[block_id] = digest
        seq.num_hashed_blocks = num_full

    def reset_prefix_cache(self) -> None:
        """Forget all cached-but-free blocks (referenced blocks keep their hashes)."""
        while self.free_cached:
            block_id, _ = self.free_cached.popitem(last=False)
            del self.hash_to_block[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.free_empty.append(block_id)

    # ---- invariants ----------------------------------------------------------------------------

    def check_integrity(self, block_tables: Iterable[list[int]]) -> None:
        """Raise AssertionError unless every invariant in the module docstring holds."""
        holders = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                assert 0 <= block_id < self.num_blocks, f"block id {block_id} out of range"
                holders[block_id] += 1
        assert holders == self.ref_counts, "ref counts differ from the number of holders: " + str(
            [(b, self.ref_counts[b], holders[b]) for b in range(self.num_blocks)
             if holders[b] != self.ref_counts[b]][:8]
        )
        empty, cached = set(self.free_empty), set(self.free_cached)
        assert len(empty) == len(self.free_empty), "a block is twice in the free list"
        assert not empty & cached, "a block is both free-empty and free-cached"
        for b in range(self.num_blocks):
            is_free = b in empty or b in cached
            assert is_free == (self.ref_counts[b] == 0), f"block {b}: free xor referenced broken"
            if b in empty:
                assert self.block_hash[b] is None, f"free-empty block {b} has a hash"
            if b in cached:
                assert self.block_hash[b] is not None, f"free-cached block {b} has no hash"
            digest = self.block_hash[b]
            if digest is not None:
                assert self.hash_to_block.get(digest) == b, f"block {b}'s hash maps elsewhere"
        for digest, b in self.hash_to_block.items():
            assert self.block_hash[b] == digest, f"hash maps to block {b} which holds another hash"
