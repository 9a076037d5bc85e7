"""Group prefixes' keys and values, gathered once and kept across steps.

A prefix group's shared blocks never change while the group lives, yet every step that reads
them through shared-prefix attention would gather them out of the paged cache again, per layer
(for docqa about a tenth of a decode step). The store keeps each group's gathered K and V, per
layer, laid out as the attention kernel reads them, filled at first use. It is bounded in bytes
and forgets the least recently used groups first; forgetting only means gathering again. Keys
are (group id, shared tokens): group ids are never reused by an engine, so a released group's
entry can only age out, never be read for another group's blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]


class PrefixKVStore:
    def __init__(self, num_layers: int, bytes_per_token: int, max_bytes: int) -> None:
        """`bytes_per_token`: one token's K and V in one layer."""
        self.num_layers = num_layers
        self.bytes_per_token = bytes_per_token
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], list[LayerKV | None]] = OrderedDict()
        self.num_bytes = 0  # what the entries take once all their layers are filled (an upper bound)

    def _entry_bytes(self, key: tuple[int, int]) -> int:
        return key[1] * self.bytes_per_token * self.num_layers

    def get(self, group_id: int, shared_tokens: int) -> list[LayerKV | None] | None:
        """The per-layer slots of a prefix (None where not gathered yet), or None when the
        prefix alone is larger than the store. The caller may keep the list for this step even
        if a later `get` evicts it."""
        key = (group_id, shared_tokens)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        if self._entry_bytes(key) > self.max_bytes:
            return None
        while self._entries and self.num_bytes + self._entry_bytes(key) > self.max_bytes:
            oldest, _ = self._entries.popitem(last=False)
            self.num_bytes -= self._entry_bytes(oldest)
        entry = self._entries[key] = [None] * self.num_layers
        self.num_bytes += self._entry_bytes(key)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
