"""Prefix groups at run time: shared KV with an explicit lifetime.

A group's prefix is computed once, by a prefix request that starts from its parent group's KV.
When it is done, the group takes over the request's blocks and pins them (one reference held by
the group) while any member or child group still needs them; when the last one finishes, the
group drops its references and the blocks return to the pool. No LRU guessing: the plan says
exactly who needs what.

A member joins a ready group by sharing the group's full blocks (a reference each) and, when the
prefix ends inside a block, by copying that partial block's KV into a block of its own
(copy-on-write), since the member writes its own tokens into the rest of it.

With sliding windows (KVCacheManager.window), a prefix's blocks wholly before its last
`window - 1` positions are read by nobody: every member's and child group's queries sit at or
after the prefix's end. The prefix request frees them as it computes and the group frees the
rest when it takes the blocks, so a group pins at most a window's worth of blocks; their table
entries are `null_block`, and members' tables begin with exactly the group's entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.request import Request


@dataclass(slots=True)
class GroupState:
    group_id: int
    parent: int | None
    prefix_end: int  # the group's prefix covers positions [0, prefix_end) of every member
    num_pending: int  # members and child groups not yet finished
    estimated_blocks: int  # KV blocks the prefix and its direct members need at most
    blocks: list[int] = field(default_factory=list)  # held once ready
    is_ready: bool = False
    is_released: bool = False


class GroupManager:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.groups: dict[int, GroupState] = {}
        self._enclosing: dict[int, tuple[tuple[int, int], ...]] = {}
        self._pinned: list[int] = []  # groups holding their prefix KV, in the order they got it

    def add_group(
        self, group_id: int, parent: int | None, prefix_end: int, num_pending: int, estimated_blocks: int
    ) -> None:
        assert group_id not in self.groups
        self.groups[group_id] = GroupState(group_id, parent, prefix_end, num_pending, estimated_blocks)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def is_ready(self, group_id: int | None) -> bool:
        return group_id is None or self.groups[group_id].is_ready

    def num_shared_tokens(self, group_id: int | None) -> int:
        """Positions served by the group's full blocks: the part read once per group."""
        if group_id is None:
            return 0
        prefix_end = self.groups[group_id].prefix_end
        return prefix_end - prefix_end % self.kv.block_size

    def enclosing(self, group_id: int | None) -> tuple[tuple[int, int], ...]:
        """(group id, shared tokens) of the groups that enclose `group_id`, nearest first, up to
        the first without a full block. A member's block table begins with each one's shared
        blocks (a child group's prefix was computed on top of its parent's KV)."""
        if group_id is None:
            return ()
        levels = self._enclosing.get(group_id)
        if levels is None:
            found = []
            parent = self.groups[group_id].parent
            while parent is not None and self.num_shared_tokens(parent) > 0:
                found.append((parent, self.num_shared_tokens(parent)))
                parent = self.groups[parent].parent
            levels = self._enclosing[group_id] = tuple(found)
        return levels

    def attach_counts(self, group_id: int) -> tuple[int, int, int]:
        """What attaching a member to the group gives it, before anything changes: its first own
        position, the blocks its table starts with, and how many of them are new (the copy of a
        partial last prefix block)."""
        group = self.groups[group_id]
        copied = 1 if group.prefix_end % self.kv.block_size else 0
        return group.prefix_end, group.prefix_end // self.kv.block_size + copied, copied

    def attach(self, request: Request) -> tuple[int, int, int] | None:
        """Start `request` from its group's KV. Returns the block copy to do, if any. The caller
        has checked that a block is free for the copy (`attach_counts`)."""
        group = self.groups[request.group_id]
        assert group.is_ready and not group.is_released
        block_size = self.kv.block_size
        num_full = group.prefix_end // block_size
        self.kv.share_blocks(request, group.blocks[:num_full])
        copy = None
        tail = group.prefix_end % block_size
        if tail:
            assert group.blocks[num_full] != self.kv.null_block, "a prefix's last block is inside every window"
            (target,) = self.kv.pool.allocate(1)
            self.kv.block_tables[request.request_id].append(target)
            copy = (group.blocks[num_full], target, tail)
        request.num_computed_tokens = group.prefix_end
        request.num_cached_tokens = group.prefix_end
        return copy

    def on_prefix_computed(self, request: Request) -> None:
        group = self.groups[request.prefix_of]
        # Members start at the prefix's end: what lies before its window is never read again.
        self.kv.free_out_of_window(request, self.num_shared_tokens(group.parent) // self.kv.block_size)
        group.blocks = self.kv.take_table(request)
        assert len(group.blocks) == num_blocks_for(group.prefix_end, self.kv.block_size)
        group.is_ready = True
        self._pinned.append(group.group_id)

    def on_finished(self, group_id: int | None) -> list[int]:
        """A member or child group of `group_id` is done; release the groups nobody needs any
        more (bottom-up) and return their ids."""
        released = []
        while group_id is not None:
            group = self.groups[group_id]
            group.num_pending -= 1
            assert group.num_pending >= 0, f"group {group_id} finished more often than it has members"
            if group.num_pending:
                break
            self._drop_blocks(group)
            group.is_released = True
            released.append(group_id)
            group_id = group.parent
        return released

    def chain(self, group_id: int | None) -> list[int]:
        """The group and the groups around it, nearest first."""
        found = []
        while group_id is not None:
            found.append(group_id)
            group_id = self.groups[group_id].parent
        return found

    def unpin_candidates(self) -> list[int]:
        """Groups holding KV that no other group holding KV builds on, most recently readied
        first: the ones that can give their KV back when pinned prefixes leave no room."""
        parents = {self.groups[g].parent for g in self._pinned}
        return [g for g in reversed(self._pinned) if g not in parents]

    def unpin(self, group_id: int) -> None:
        """Give the group's prefix KV back to the pool; its prefix must be computed again before
        members can start from it (members that started hold their own references)."""
        group = self.groups[group_id]
        self._drop_blocks(group)
        group.is_ready = False

    def _drop_blocks(self, group: GroupState) -> None:
        self.kv.release_blocks(group.blocks[::-1])
        group.blocks = []
        if group.group_id in self._pinned:
            self._pinned.remove(group.group_id)

    def held_blocks(self) -> list[list[int]]:
        """The groups' tables (`null_block` entries included), for the integrity check."""
        return [g.blocks for g in self.groups.values() if g.blocks]
