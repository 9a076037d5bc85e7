"""KVCacheManager: each request's block table, grown a step at a time from the BlockPool.

Sliding windows (`window`, the longest of the model's layers, or None when some layer attends to
every key): a query at position p of a layer with window w reads keys (p - w, p] only, so once a
sequence's next query sits at p, its keys before p - window + 1 are never read again by any
layer. `free_out_of_window` gives the blocks wholly before that back to the pool and puts
`null_block` in their place, so a table still maps every position to a valid block index (the
runtime's cache has one block more than the pool for it, never allocated and never written):
attention reads it only where a window mask hides it or a slice drops it. Blocks a request took
from its prefix group are the group's to free (core/groups.py), never the member's: every
member's table begins with exactly the group's blocks.
"""

from __future__ import annotations

from collections import Counter

from treebatch.core.block_pool import BlockPool
from treebatch.core.request import Request


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Owns the mapping request -> block ids. `allocate_slots` asks, then commits: a refusal
    changes nothing."""

    def __init__(self, num_blocks: int, block_size: int, window: int | None = None) -> None:
        assert window is None or window > 0
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.window = window
        # Stands in a table for a block freed out of the window: one past the pool's ids.
        self.null_block = num_blocks
        self.block_tables: dict[str, list[int]] = {}
        self._num_null: dict[str, int] = {}  # per table: entries that are `null_block`
        self._freed_upto: dict[str, int] = {}  # per table: entries before this are settled

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_live_blocks(self, request: Request) -> int:
        """Blocks the request's table holds, not counting those freed out of the window."""
        table = self.block_tables.get(request.request_id)
        return 0 if table is None else len(table) - self._num_null.get(request.request_id, 0)

    def peak_blocks(self, num_tokens: int, chunk: int = 1) -> int:
        """Live blocks a sequence of `num_tokens` holds at most, computed `chunk` tokens a step
        (the window's keys before the chunk plus the chunk, over one extra block boundary)."""
        whole = num_blocks_for(num_tokens, self.block_size)
        if self.window is None:
            return whole
        return min(whole, num_blocks_for(self.window - 1 + chunk, self.block_size) + 1)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so that the request's first `computed + new` tokens have slots."""
        held = len(self.block_tables.get(request.request_id, ()))
        needed = num_blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - held)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request slots for `num_new_tokens` more tokens; False (and no change) if full."""
        num_new = self.num_new_blocks(request, num_new_tokens)
        if not self.pool.can_allocate(num_new):
            return False
        table = self.block_tables.setdefault(request.request_id, [])
        if num_new:
            table.extend(self.pool.allocate(num_new))
        return True

    def free_out_of_window(self, request: Request, num_protected: int = 0) -> int:
        """Release the request's blocks that no layer reads again, now that its next query sits
        at `num_computed_tokens`; the first `num_protected` table entries (its group's shared
        blocks) stay. Returns how many blocks went back to the pool. The table is replaced, not
        changed in place, so a step planned earlier keeps the table it was planned with."""
        if self.window is None:
            return 0
        request_id = request.request_id
        table = self.block_tables.get(request_id)
        if not table:
            return 0
        first_needed = request.num_computed_tokens - self.window + 1
        num_dead = min(max(0, first_needed) // self.block_size, len(table))
        start = max(self._freed_upto.get(request_id, 0), num_protected)
        if num_dead <= start:
            return 0
        dead = table[start:num_dead]
        assert self.null_block not in dead, f"{request}: a freed block outside the settled part"
        self.block_tables[request_id] = table[:start] + [self.null_block] * len(dead) + table[num_dead:]
        self._freed_upto[request_id] = num_dead
        self._num_null[request_id] = self._num_null.get(request_id, 0) + len(dead)
        self.pool.release(dead[::-1])
        return len(dead)

    def free(self, request: Request) -> None:
        """Release the request's blocks. Freed in reverse so a request's tail is reused first."""
        table = self._pop(request.request_id)
        if table:
            self.pool.release([b for b in reversed(table) if b != self.null_block])

    def fits_at_all(self, num_tokens: int, chunk: int | None = None) -> bool:
        """Whether a sequence of `num_tokens`, computed at most `chunk` tokens a step (None: all
        at once), can ever hold its KV in the whole pool."""
        return self.peak_blocks(num_tokens, num_tokens if chunk is None else chunk) <= self.pool.num_blocks

    def share_blocks(self, request: Request, blocks: list[int]) -> None:
        """Start the request's table with blocks someone else computed (one more reference each;
        entries freed out of the window stay `null_block` and take no reference)."""
        assert request.request_id not in self.block_tables, f"{request} already holds blocks"
        live = [b for b in blocks if b != self.null_block]
        self.pool.add_reference(live)
        self.block_tables[request.request_id] = list(blocks)
        if len(live) < len(blocks):
            self._num_null[request.request_id] = len(blocks) - len(live)

    def take_table(self, request: Request) -> list[int]:
        """Remove the request's table, keeping its references: the caller now owns them (all
        but the `null_block` entries)."""
        table = self._pop(request.request_id)
        assert table is not None, f"{request} holds no blocks"
        return table

    def _pop(self, request_id: str) -> list[int] | None:
        self._num_null.pop(request_id, None)
        self._freed_upto.pop(request_id, None)
        return self.block_tables.pop(request_id, None)

    def release_blocks(self, blocks: list[int]) -> None:
        """Drop one reference to each block of a table taken over (`take_table`), in order."""
        self.pool.release([b for b in blocks if b != self.null_block])

    def check_integrity(self, other_owners: list[list[int]] | None = None) -> None:
        """Every block's reference count equals the number of tables (and other owners) holding it."""
        owners: Counter[int] = Counter()
        for table in self.block_tables.values():
            owners.update(table)
        for table in other_owners or ():
            owners.update(table)
        for request_id, table in self.block_tables.items():
            assert table.count(self.null_block) == self._num_null.get(request_id, 0), request_id
        owners.pop(self.null_block, None)
        assert all(0 <= b < self.pool.num_blocks for b in owners), "a table names a block outside the pool"
        self.pool.check_integrity(dict(owners))
