"""The row layout of one step: which chunks read a group's shared prefix once, and in what order
the chunks' tokens lie in the flat batch the model runs.

Rows go plain single-query chunks first (one batched product over the paged cache), then plain
prefill chunks, then each shared-prefix group, its single-query chunks first. The model runner
turns this layout into tensors; the cost model prices the same layout. Torch-free.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from treebatch.core.outputs import ScheduledChunk
from treebatch.core.rules import decodes_join_prefix, reads_prefix_once


@dataclass(frozen=True, slots=True)
class CascadeSpec:
    """A group whose prefix positions [0, shared) are read once for all `members` in this step:
    full blocks that every member's table begins with. Single-query members come first."""

    group: int
    shared: int
    members: tuple[ScheduledChunk, ...]

    @property
    def num_queries(self) -> int:
        return sum(c.num_tokens for c in self.members)

    @property
    def num_single_query(self) -> int:
        return sum(1 for c in self.members if c.is_single_query)


@dataclass(slots=True)
class StepLayout:
    decodes: list[ScheduledChunk]  # plain single-query chunks
    prefills: list[ScheduledChunk]  # plain chunks of more than one query
    cascades: list[CascadeSpec] = field(default_factory=list)

    @property
    def ordered(self) -> list[ScheduledChunk]:
        """Every chunk, in row order."""
        return self.decodes + self.prefills + [c for cascade in self.cascades for c in cascade.members]

    def sample_rows(self) -> tuple[list[int], list[str]]:
        """The row of each chunk's last token where it samples, and whose sample it is."""
        rows: list[int] = []
        ids: list[str] = []
        row = 0
        for chunk in self.ordered:
            row += chunk.num_tokens
            if chunk.needs_sample:
                rows.append(row - 1)
                ids.append(chunk.request_id)
        return rows, ids

    @property
    def num_prefill_chunks(self) -> int:
        """Chunks of more than one query, plain or in a group."""
        return sum(1 for c in self.ordered if not c.is_single_query)

    def context_pairs(self) -> tuple[int, int]:
        """(query, cached key) pairs the step's attention reads, as (single-query, many-query).

        A single query reads each of its keys from memory once per query, so its pairs cost what
        moving a key costs; the queries of a chunk read their keys together, one matrix product,
        so theirs cost arithmetic. A shared-prefix group's queries against its prefix are one
        product over keys read once: many-query pairs, whatever the members' own kind."""
        single = sum(c.start_position for c in self.decodes)
        many = sum(c.num_tokens * c.start_position for c in self.prefills)
        for cascade in self.cascades:
            many += cascade.num_queries * cascade.shared
            for chunk in cascade.members:
                own = chunk.num_tokens * (chunk.start_position - cascade.shared)
                if chunk.is_single_query:
                    single += own
                else:
                    many += own
        return single, many


def layout_step(chunks: Sequence[ScheduledChunk], min_queries: int | None, min_decodes: int) -> StepLayout:
    """Split a step's chunks into plain ones and shared-prefix groups.

    Groups are settled deepest first: one with enough queries in this step (its members' and
    those handed up from groups below it) is read once; one with too few hands its chunks up to
    the group around it, whose shared blocks are a shorter prefix of theirs. So a group split
    into small subgroups (questions that share their first words) still reads the document once
    per step. A group's single-query chunks join only when there are `min_decodes` of them."""
    plain: list[ScheduledChunk] = []
    if min_queries is None:
        plain = list(chunks)
        return StepLayout([c for c in plain if c.is_single_query], [c for c in plain if not c.is_single_query])
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
        if reads_prefix_once(sum(c.num_tokens for c in members), min_queries):
            singles = [c for c in members if c.is_single_query]
            if not decodes_join_prefix(len(singles), min_decodes):
                plain.extend(singles)
                members = [c for c in members if not c.is_single_query]
            if members:
                ordered = sorted(members, key=lambda c: not c.is_single_query)
                cascades.append(CascadeSpec(group, shared[group], tuple(ordered)))
        elif parent[group] is not None:
            waiting[parent[group]].extend(members)
        else:
            plain.extend(members)
    return StepLayout([c for c in plain if c.is_single_query], [c for c in plain if not c.is_single_query], cascades)
