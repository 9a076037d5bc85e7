"""BlockPool: the paged KV cache's blocks, their reference counts and the free list.

A block holds `block_size` token slots of K and V for every layer. The lowest free block ids
are handed out first (tests can predict them), so the blocks in use stay packed at the front of
the cache: its memory, which the OS maps in on first touch, grows only to the most blocks ever
in use at once, and a step's new keys land on pages already mapped. (Handed out in turn from a
queue, every block of a multi-GB cache was touched once before any was reused, each first
write faulting pages in.) A block may be referenced by several owners (a shared prefix); it
returns to the free set when its last reference is dropped.
"""

from __future__ import annotations

import heapq


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        # A min-heap of free ids (sorted, so already a heap): O(log n) to take or return one.
        self._free: list[int] = list(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self.peak_used_blocks = 0  # the most blocks in use at once since `reset_peak`

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with one reference. Ask `can_allocate` first."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        blocks = [heapq.heappop(self._free) for _ in range(num_blocks)]
        for block_id in blocks:
            self._ref_counts[block_id] = 1
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_blocks - len(self._free))
        return blocks

    def reset_peak(self) -> None:
        """Start counting the peak again from the blocks in use now."""
        self.peak_used_blocks = self.num_used_blocks

    def add_reference(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} is free"
            self._ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks that reach zero return to the free list."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} released more often than referenced"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                heapq.heappush(self._free, block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Free list and reference counts agree; with `expected_refs`, counts equal the owners'."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has a negative count"
            assert (count == 0) == (block_id in free), (
                f"block {block_id}: ref count {count} but {'' if block_id in free else 'not '}free"
            )
        if expected_refs is not None:
            for block_id, count in enumerate(self._ref_counts):
                owners = expected_refs.get(block_id, 0)
                assert count == owners, f"block {block_id}: ref count {count}, owners {owners}"
