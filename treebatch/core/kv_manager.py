"""KVCacheManager: each request's block table, grown a step at a time from the BlockPool."""

from __future__ import annotations

from collections import Counter

from treebatch.core.block_pool import BlockPool
from treebatch.core.request import Request


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Owns the mapping request -> block ids. `allocate_slots` asks, then commits: a refusal
    changes nothing."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

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

    def free(self, request: Request) -> None:
        """Release the request's blocks. Freed in reverse so a request's tail is reused first."""
        table = self.block_tables.pop(request.request_id, None)
        if table:
            self.pool.release(table[::-1])

    def fits_at_all(self, num_tokens: int) -> bool:
        return num_blocks_for(num_tokens, self.block_size) <= self.pool.num_blocks

    def share_blocks(self, request: Request, blocks: list[int]) -> None:
        """Start the request's table with blocks someone else computed (one more reference each)."""
        assert request.request_id not in self.block_tables, f"{request} already holds blocks"
        self.pool.add_reference(blocks)
        self.block_tables[request.request_id] = list(blocks)

    def take_table(self, request: Request) -> list[int]:
        """Remove the request's table, keeping its references: the caller now owns them."""
        return self.block_tables.pop(request.request_id)

    def check_integrity(self, other_owners: list[list[int]] | None = None) -> None:
        """Every block's reference count equals the number of tables (and other owners) holding it."""
        owners: Counter[int] = Counter()
        for table in self.block_tables.values():
            owners.update(table)
        for table in other_owners or ():
            owners.update(table)
        self.pool.check_integrity(dict(owners))
