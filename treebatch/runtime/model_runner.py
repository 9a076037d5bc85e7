"""ModelRunner: StepPlan -> tensors (ids, positions, slots, block tables) -> forward -> sample.

The runner decides nothing about what runs; it lays the plan's chunks out as one flat batch:
plain decodes first (one batched attention product), then plain prefill chunks, then the chunks
of each prefix group that has enough queries in this step to gain from shared-prefix attention.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from treebatch.core.outputs import ScheduledChunk, StepPlan, StepResult
from treebatch.layers import native
from treebatch.layers.attention import (
    AttentionMetadata,
    CascadeGroup,
    PrefillChunk,
    SuffixChunk,
    causal_mask,
)
from treebatch.models.llama import LlamaForCausalLM
from treebatch.runtime.prefix_store import PrefixKVStore
from treebatch.runtime.sampler import Sampler

DEFAULT_PREFIX_STORE_BYTES = 256 << 20
# With decodes read in place by the C kernel, a group's decodes gain from reading the prefix once
# only from about this many in a step (benchmarks/cascade_threshold.py: 448-token prefix, kept
# prefix K/V, 2 cores).
DEFAULT_CASCADE_MIN_DECODES = 8


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        eos_token_ids: tuple[int, ...],
        cascade_min_queries: int | None = 4,
        prefix_store_bytes: int = DEFAULT_PREFIX_STORE_BYTES,
        cascade_min_decodes: int | None = None,
    ) -> None:
        """`cascade_min_queries`: a group needs this many queries in a step for shared-prefix
        attention; None turns it off. `cascade_min_decodes`: and this many single-query rows for
        its decodes to join (fewer read their whole context in place, which is cheaper; default:
        `DEFAULT_CASCADE_MIN_DECODES` where the in-place kernel is built, else no extra bound).
        `prefix_store_bytes`: memory for group prefixes' K and V gathered once and reused across
        steps (0: gather every step)."""
        self.model = model
        self.cascade_min_queries = cascade_min_queries
        if cascade_min_decodes is None:
            cascade_min_decodes = DEFAULT_CASCADE_MIN_DECODES if native.paged_decode_kernel() is not None else 1
        self.cascade_min_decodes = cascade_min_decodes
        self.kv_cache = kv_cache
        self.block_size = block_size
        num_layers, _, _, num_kv_heads, head_dim = kv_cache.shape
        self.prefix_store = (
            PrefixKVStore(num_layers, 2 * num_kv_heads * head_dim * kv_cache.element_size(), prefix_store_bytes)
            if prefix_store_bytes > 0
            else None
        )
        self.sampler = Sampler(model.config.vocab_size, eos_token_ids)
        self._offsets = np.arange(block_size, dtype=np.int64)

    @classmethod
    def for_layout(
        cls,
        block_size: int,
        cascade_min_queries: int | None = 4,
        cascade_min_decodes: int = 1,
        prefix_store: PrefixKVStore | None = None,
    ) -> ModelRunner:
        """A runner without model or cache that only lays steps out (`_split_cascades`,
        `_prepare`): for attention tests and benchmarks that bring their own KV tensors."""
        runner = cls.__new__(cls)
        runner.block_size = block_size
        runner._offsets = np.arange(block_size, dtype=np.int64)
        runner.cascade_min_queries = cascade_min_queries
        runner.cascade_min_decodes = cascade_min_decodes
        runner.prefix_store = prefix_store
        return runner

    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_request_ids:
            self.sampler.remove_request(request_id)
        for new in plan.new_requests:
            self.sampler.add_request(new)
        if plan.is_empty:
            return StepResult({})
        self._copy_blocks(plan.block_copies)

        plain, cascades = self._split_cascades(plan.chunks)
        decodes = [c for c in plain if c.is_single_query]
        prefills = [c for c in plain if not c.is_single_query]
        input_ids, positions, slot_mapping, metadata = self._prepare(decodes, prefills, cascades)
        ordered = decodes + prefills + [c for _, _, members in cascades for c in members]

        sample_rows: list[int] = []
        sample_ids: list[str] = []
        row = 0
        for chunk in ordered:
            row += chunk.num_tokens
            if chunk.needs_sample:
                sample_rows.append(row - 1)
                sample_ids.append(chunk.request_id)
        logits = self.model.forward(
            input_ids, positions, metadata, self.kv_cache, torch.tensor(sample_rows, dtype=torch.long)
        )
        if not sample_ids:
            return StepResult({})
        tokens, logprobs = self.sampler.sample(logits, sample_ids)
        return StepResult(dict(zip(sample_ids, tokens)), logprobs)

    def _split_cascades(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[list[ScheduledChunk], list[tuple[int, int, list[ScheduledChunk]]]]:
        """Chunks that read a shared prefix once, as (group, shared tokens, members), each
        group's single-query chunks first; the rest take the plain paged path.

        Groups are settled deepest first: one with enough queries in this step (its members' and
        those handed up from groups below it) is read once; one with too few hands its chunks up
        to the group around it, whose shared blocks are a shorter prefix of theirs. So a group
        split into small subgroups (questions that share their first words) still reads the
        document once per step."""
        if self.cascade_min_queries is None:
            return list(chunks), []
        plain: list[ScheduledChunk] = []
        waiting: dict[int, list[ScheduledChunk]] = defaultdict(list)
        shared: dict[int, int] = {}
        parent: dict[int, int | None] = {}
        depth: dict[int, int] = {}
        for chunk in chunks:
            if chunk.group_id is None or chunk.num_shared_tokens == 0:
                plain.append(chunk)
                continue
            levels = ((chunk.group_id, chunk.num_shared_tokens), *chunk.enclosing)
            for index, (group, tokens) in enumerate(levels):
                shared[group] = tokens
                parent[group] = levels[index + 1][0] if index + 1 < len(levels) else None
                depth[group] = len(levels) - index
            waiting[chunk.group_id].append(chunk)
        cascades = []
        for group in sorted(shared, key=depth.__getitem__, reverse=True):
            members = waiting.pop(group, [])
            if not members:
                continue
            if sum(c.num_tokens for c in members) >= self.cascade_min_queries:
                decodes = [c for c in members if c.is_single_query]
                if len(decodes) < self.cascade_min_decodes:
                    plain.extend(decodes)
                    members = [c for c in members if not c.is_single_query]
                if members:
                    cascades.append((group, shared[group], sorted(members, key=lambda c: not c.is_single_query)))
            elif parent[group] is not None:
                waiting[parent[group]].extend(members)
            else:
                plain.extend(members)
        return plain, cascades

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write of partial prefix blocks: a member's own copy of the prefix's tail KV."""
        size = self.block_size
        for source, target, num_tokens in copies:
            self.kv_cache[:, :, target * size : target * size + num_tokens] = self.kv_cache[
                :, :, source * size : source * size + num_tokens
            ]

    def _slots(self, block_table: list[int], start: int, stop: int) -> np.ndarray:
        """Cache slots of positions [start, stop) of a sequence."""
        first, last = start // self.block_size, (stop - 1) // self.block_size + 1
        blocks = np.asarray(block_table[first:last], dtype=np.int64)
        slots = (blocks[:, None] * self.block_size + self._offsets).reshape(-1)
        offset = start - first * self.block_size
        return slots[offset : offset + stop - start]

    def _prepare(
        self,
        decodes: list[ScheduledChunk],
        prefills: list[ScheduledChunk],
        cascades: list[tuple[int, int, list[ScheduledChunk]]] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []

        decode_blocks = decode_lengths = None
        if decodes:
            contexts = np.asarray([c.start_position + 1 for c in decodes], dtype=np.int64)
            padded = self._padded_blocks(decodes, 0, contexts)
            decode_lengths = torch.from_numpy(contexts)
            ids.extend(chunk.token_ids[0] for chunk in decodes)
            last = contexts - 1
            positions.append(last)
            slot_parts.append(padded[np.arange(len(decodes)), last // self.block_size] * self.block_size + last % self.block_size)
            decode_blocks = torch.from_numpy(padded.reshape(-1))

        prefill_chunks: list[PrefillChunk] = []
        row = len(decodes)
        for chunk in prefills:
            start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
            ids.extend(chunk.token_ids)
            positions.append(np.arange(start, stop, dtype=np.int64))
            slot_parts.append(self._slots(chunk.block_table, start, stop))
            num_blocks_used = -(-stop // self.block_size)
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
        for group, shared, members in cascades:
            for chunk in members:
                start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
                ids.extend(chunk.token_ids)
                positions.append(np.arange(start, stop, dtype=np.int64))
                slot_parts.append(self._slots(chunk.block_table, start, stop))
            cascade_groups.append(self._cascade_group(members, row, shared, group))
            row += sum(c.num_tokens for c in members)

        slot_mapping = torch.from_numpy(np.concatenate(slot_parts))
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_size=self.block_size,
            num_decodes=len(decodes),
            decode_blocks=decode_blocks,
            decode_lengths=decode_lengths,
            prefills=prefill_chunks,
            cascades=cascade_groups,
        )
        input_ids = torch.tensor(ids, dtype=torch.long)
        return input_ids, torch.from_numpy(np.concatenate(positions)), slot_mapping, metadata

    def _padded_blocks(
        self, decodes: list[ScheduledChunk], first_block: int, lengths: np.ndarray
    ) -> np.ndarray:
        """Single-query chunks' keys as one padded batch: the blocks holding each one's `lengths`
        keys from block `first_block` of its table on ([S, max_blocks], padded with block 0)."""
        num_blocks = -(-lengths // self.block_size)
        padded = np.zeros((len(decodes), int(num_blocks.max())), dtype=np.int64)
        for i, chunk in enumerate(decodes):
            padded[i, : num_blocks[i]] = chunk.block_table[first_block : first_block + num_blocks[i]]
        return padded

    def _cascade_group(
        self, members: list[ScheduledChunk], first_row: int, shared: int, group: int
    ) -> CascadeGroup:
        """Members laid out from `first_row`, single-query chunks first (see _split_cascades),
        reading positions [0, shared) once: full blocks every member's table begins with."""
        size = self.block_size
        assert shared % size == 0 and all(c.num_shared_tokens >= shared for c in members)
        first_own = shared // size
        decodes = [c for c in members if c.is_single_query]
        suffix_blocks = suffix_lengths = None
        if decodes:
            lengths = np.asarray([c.start_position + 1 - shared for c in decodes], dtype=np.int64)
            suffix_blocks = torch.from_numpy(self._padded_blocks(decodes, first_own, lengths).reshape(-1))
            suffix_lengths = torch.from_numpy(lengths)
        chunks = []
        for chunk in members[len(decodes) :]:
            start, stop = chunk.start_position, chunk.start_position + chunk.num_tokens
            last_block = -(-stop // size)
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
            num_rows=sum(c.num_tokens for c in members),
            num_decodes=len(decodes),
            decode_suffix_blocks=suffix_blocks,
            decode_suffix_lengths=suffix_lengths,
            chunks=chunks,
            prefix_kv=None if self.prefix_store is None else self.prefix_store.get(group, shared),
        )

