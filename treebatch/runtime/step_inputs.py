"""A step's layout (core/step_layout.py) as the tensors the model reads: token ids, positions,
cache slots and the attention metadata of each part (plain single-query rows, plain prefill
chunks, shared-prefix groups)."""

from __future__ import annotations

import numpy as np
import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.core.step_layout import CascadeSpec, StepLayout
from treebatch.layers.attention import AttentionMetadata, CascadeGroup, PrefillChunk, SuffixChunk, causal_mask
from treebatch.runtime.prefix_store import PrefixKVStore


def build_step_inputs(
    layout: StepLayout, block_size: int, prefix_store: PrefixKVStore | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input ids, positions, slot mapping, attention metadata), rows in the layout's order.
    `prefix_store`: group prefixes' K and V kept across steps (None: gathered every step)."""
    offsets = np.arange(block_size, dtype=np.int64)
    ids: list[int] = []
    positions: list[np.ndarray] = []
    slot_parts: list[np.ndarray] = []

    def add_rows(chunk: ScheduledChunk) -> None:
        start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
        ids.extend(chunk.token_ids)
        positions.append(np.arange(start, stop, dtype=np.int64))
        slot_parts.append(_slots(chunk.block_table, start, stop, block_size, offsets))

    decodes = layout.decodes
    decode_blocks = decode_lengths = None
    if decodes:
        contexts = np.asarray([c.start_position + 1 for c in decodes], dtype=np.int64)
        padded = _padded_blocks(decodes, 0, contexts, block_size)
        decode_lengths = torch.from_numpy(contexts)
        ids.extend(chunk.token_ids[0] for chunk in decodes)
        last = contexts - 1
        positions.append(last)
        slot_parts.append(padded[np.arange(len(decodes)), last // block_size] * block_size + last % block_size)
        decode_blocks = torch.from_numpy(padded.reshape(-1))

    prefill_chunks: list[PrefillChunk] = []
    row = len(decodes)
    for chunk in layout.prefills:
        start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
        add_rows(chunk)
        num_blocks_used = -(-stop // block_size)
        prefill_chunks.append(
            PrefillChunk(
                query_start=row,
                num_queries=chunk.num_tokens,
                context_len=stop,
                context_blocks=torch.tensor(chunk.block_table[:num_blocks_used], dtype=torch.long),
                bias=causal_mask(start, chunk.num_tokens, stop),
            )
        )
        row += chunk.num_tokens

    cascade_groups = []
    for cascade in layout.cascades:
        for chunk in cascade.members:
            add_rows(chunk)
        cascade_groups.append(_cascade_group(cascade, row, block_size, prefix_store))
        row += cascade.num_queries

    slot_mapping = torch.from_numpy(np.concatenate(slot_parts))
    position_ids = torch.from_numpy(np.concatenate(positions))
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_size=block_size,
        num_decodes=len(decodes),
        decode_blocks=decode_blocks,
        decode_lengths=decode_lengths,
        prefills=prefill_chunks,
        cascades=cascade_groups,
        positions=position_ids,
    )
    input_ids = torch.tensor(ids, dtype=torch.long)
    return input_ids, position_ids, slot_mapping, metadata


def _slots(block_table: list[int], start: int, stop: int, block_size: int, offsets: np.ndarray) -> np.ndarray:
    """Cache slots of positions [start, stop) of a sequence."""
    first, last = start // block_size, (stop - 1) // block_size + 1
    blocks = np.asarray(block_table[first:last], dtype=np.int64)
    slots = (blocks[:, None] * block_size + offsets).reshape(-1)
    offset = start - first * block_size
    return slots[offset : offset + stop - start]


def _padded_blocks(
    decodes: list[ScheduledChunk] | tuple[ScheduledChunk, ...], first_block: int, lengths: np.ndarray, block_size: int
) -> np.ndarray:
    """Single-query chunks' keys as one padded batch: the blocks holding each one's `lengths`
    keys from block `first_block` of its table on ([S, max_blocks], padded with block 0)."""
    num_blocks = -(-lengths // block_size)
    padded = np.zeros((len(decodes), int(num_blocks.max())), dtype=np.int64)
    for i, chunk in enumerate(decodes):
        padded[i, : num_blocks[i]] = chunk.block_table[first_block : first_block + num_blocks[i]]
    return padded


def _cascade_group(
    cascade: CascadeSpec, first_row: int, block_size: int, prefix_store: PrefixKVStore | None
) -> CascadeGroup:
    """Members laid out from `first_row`, single-query chunks first, reading positions
    [0, shared) once: full blocks every member's table begins with."""
    members, shared = cascade.members, cascade.shared
    assert shared % block_size == 0 and all(c.num_shared_tokens >= shared for c in members)
    first_own = shared // block_size
    num_decodes = cascade.num_single_query
    decodes = members[:num_decodes]
    suffix_blocks = suffix_lengths = None
    if decodes:
        lengths = np.asarray([c.start_position + 1 - shared for c in decodes], dtype=np.int64)
        suffix_blocks = torch.from_numpy(_padded_blocks(decodes, first_own, lengths, block_size).reshape(-1))
        suffix_lengths = torch.from_numpy(lengths)
    chunks = []
    for chunk in members[num_decodes:]:
        start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
        last_block = -(-stop // block_size)
        key_positions = torch.arange(shared, stop).unsqueeze(0)
        query_positions = torch.arange(start, stop).unsqueeze(1)
        chunks.append(
            SuffixChunk(
                num_queries=chunk.num_tokens,
                suffix_blocks=torch.tensor(chunk.block_table[first_own:last_block], dtype=torch.long),
                suffix_len=stop - shared,
                mask=key_positions <= query_positions,
            )
        )
    return CascadeGroup(
        prefix_blocks=torch.tensor(members[0].block_table[:first_own], dtype=torch.long),
        row_start=first_row,
        num_rows=cascade.num_queries,
        num_decodes=num_decodes,
        decode_suffix_blocks=suffix_blocks,
        decode_suffix_lengths=suffix_lengths,
        chunks=chunks,
        prefix_kv=None if prefix_store is None else prefix_store.get(cascade.group, shared),
    )
