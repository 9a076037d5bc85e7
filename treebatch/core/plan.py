"""plan_batch: a whole batch's prefix tree, its groups and its queue, as one frozen value.

The plan is computed once per batch (or window) from token ids and output-length estimates
alone: it touches no live state, so the scheduler (`Scheduler.add_plan`), the cost model
(`cost_model.replay`), `treebatch plan` and a sharded run can all take the same value.

- `groups`: the prefix groups in depth-first preorder (parents first). A group's prefix covers
  positions [0, prefix_end) of every sequence under it; its own part [prefix_start, prefix_end)
  extends its parent's KV.
- `queue`: the order the batch runs in, depth-first over the groups: a group's prefix entry,
  then its members and child groups (each again prefix first), so a group's KV is freed as soon
  as its subtree is done. The order policy (core/policies.py) picks the order of siblings.
- `summary`: what `treebatch plan` prints and the engine's run summary adds up.

The warm-up sample (for policies that weigh output lengths that are not known) is two
functions over plans: `warmup_sample` picks the sequences that run first, and
`rescaled_estimates` turns their measured lengths into the estimates the rest is planned with.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from treebatch.config import SchedulerConfig
from treebatch.core.grouping import GroupPlan, group_prompts
from treebatch.core.kv_manager import num_blocks_for
from treebatch.core.policies import OrderNode, order_siblings, uses_output_estimates
from treebatch.core.prefix_tree import PrefixTree

WARMUP_FRACTION = 0.015  # of the batch, spread evenly over the tree
# Below this many sequences no warm-up. The sample runs alone, in small steps, for up to
# max_tokens steps before the rest starts: from 1000 sequences on (a sample of 15 or more) that
# costs about 1% of the run. Smaller batches keep max_tokens as the estimate, which loses little:
# a scale shared by the whole batch changes neither ratio's nor blend's order.
WARMUP_MIN_REQUESTS = 1000


class EntryKind(enum.Enum):
    PREFIX = "prefix"  # compute a group's own prefix (never samples)
    MEMBER = "member"  # a sequence that starts from its group's prefix KV
    PLAIN = "plain"  # a sequence computed from scratch


@dataclass(frozen=True, slots=True)
class GroupSpec:
    group_id: int  # index into BatchPlan.groups
    parent: int | None
    prefix_start: int
    prefix_end: int
    members: tuple[int, ...]  # sequences whose own suffix hangs directly off this group
    children: tuple[int, ...]
    estimated_blocks: int  # KV blocks the prefix and its direct members are expected to need
    source: int  # a sequence under the group: its tokens [0, prefix_end) are the prefix

    @property
    def num_pending(self) -> int:
        """Members and child groups that must finish before the group's KV is freed."""
        return len(self.members) + len(self.children)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    kind: EntryKind
    index: int  # the group (PREFIX) or the sequence (MEMBER, PLAIN)
    group: int | None  # the group whose KV the entry starts from


@dataclass(frozen=True, slots=True)
class PlanSummary:
    num_sequences: int
    num_prompt_tokens: int  # logical: every prompt token of every sequence
    num_groups: int
    num_unique_tokens: int  # the tree's unique prompt tokens: no plan computes fewer
    # Prompt tokens this plan computes (the last token of each prompt is always its own, so
    # duplicates and prompt-prefixes cost one token each above the optimum).
    num_planned_tokens: int
    share_histogram: tuple[tuple[int, int], ...]  # (sequences under a group, number of groups)
    max_depth: int  # levels of nested groups (0: none)
    num_grouped_sequences: int  # sequences that start from a group's KV


@dataclass(frozen=True, slots=True)
class BatchPlan:
    groups: tuple[GroupSpec, ...]
    queue: tuple[QueueEntry, ...]
    summary: PlanSummary
    sequence_group: tuple[int, ...]  # sequence -> its deepest group, or -1

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_group)

    def prefix_end_of(self, sequence: int) -> int:
        group = self.sequence_group[sequence]
        return self.groups[group].prefix_end if group >= 0 else 0

    def groups_of(self, sequence: int) -> list[int]:
        """Root-to-deepest chain of the groups above a sequence ([] for a plain one)."""
        chain = []
        group: int | None = self.sequence_group[sequence]
        while group is not None and group >= 0:
            chain.append(group)
            group = self.groups[group].parent
        return chain[::-1]

    def dfs_order(self) -> list[int]:
        """Sequences group by group in preorder (a group's members right before the members of
        its child groups), plain sequences last."""
        order = [s for group in self.groups for s in group.members]
        order.extend(s for s, g in enumerate(self.sequence_group) if g < 0)
        return order


def plan_batch(
    prompt_token_ids: Sequence[Sequence[int]],
    output_estimates: Sequence[int],
    config: SchedulerConfig,
    block_size: int,
) -> BatchPlan:
    """Plan a batch of sequences (one per sample: n samples of a prompt are n sequences).

    `output_estimates`: tokens each sequence is expected to generate (max_tokens, exact under
    ignore_eos, or a warm-up's estimate). Without prefix sharing (or for a single sequence) the
    queue is the input order."""
    assert len(output_estimates) == len(prompt_token_ids)
    tree = PrefixTree.build(prompt_token_ids)
    if not config.enable_prefix_sharing or len(prompt_token_ids) < 2:
        queue = tuple(QueueEntry(EntryKind.PLAIN, i, None) for i in range(len(prompt_token_ids)))
        logical = tree.num_logical_tokens
        summary = PlanSummary(len(queue), logical, 0, tree.num_unique_tokens, logical, (), 0, 0)
        return BatchPlan((), queue, summary, (-1,) * len(queue))
    grouping = group_prompts(tree, min_prefix_tokens=config.min_shared_prefix_tokens)
    lengths = tree.lengths.tolist()
    groups = tuple(
        GroupSpec(
            group_id=g.group_id,
            parent=g.parent,
            prefix_start=g.prefix_start,
            prefix_end=g.prefix_end,
            members=tuple(g.members),
            children=tuple(g.children),
            estimated_blocks=num_blocks_for(g.prefix_end, block_size)
            + sum(num_blocks_for(lengths[m] + output_estimates[m] - g.prefix_end, block_size) + 1 for m in g.members),
            source=_first_sequence(grouping, g.group_id),
        )
        for g in grouping.groups
    )
    sequence_group = tuple(int(g) for g in grouping.prompt_group)
    queue = _queue(groups, sequence_group, _order_nodes(grouping, lengths, output_estimates), config.order_policy)
    summary = PlanSummary(
        num_sequences=len(lengths),
        num_prompt_tokens=tree.num_logical_tokens,
        num_groups=len(groups),
        num_unique_tokens=tree.num_unique_tokens,
        num_planned_tokens=grouping.num_computed_tokens,
        share_histogram=tuple((int(k), int(v)) for k, v in sorted(grouping.share_histogram.items())),
        max_depth=max((g.depth for g in grouping.groups), default=-1) + 1,
        num_grouped_sequences=grouping.num_grouped_prompts,
    )
    return BatchPlan(groups, queue, summary, sequence_group)


def _queue(
    groups: tuple[GroupSpec, ...],
    sequence_group: tuple[int, ...],
    nodes: dict[tuple[str, int], OrderNode],
    policy: str,
) -> tuple[QueueEntry, ...]:
    queue: list[QueueEntry] = []

    def emit_siblings(siblings: list[tuple[str, int]]) -> None:
        for position in order_siblings([nodes[s] for s in siblings], policy):
            kind, index = siblings[position]
            if kind == "group":
                group = groups[index]
                queue.append(QueueEntry(EntryKind.PREFIX, index, group.parent))
                emit_siblings([("sequence", m) for m in group.members] + [("group", c) for c in group.children])
            elif sequence_group[index] >= 0:
                queue.append(QueueEntry(EntryKind.MEMBER, index, sequence_group[index]))
            else:
                queue.append(QueueEntry(EntryKind.PLAIN, index, None))

    roots = [("group", g.group_id) for g in groups if g.parent is None]
    emit_siblings(roots + [("sequence", i) for i, g in enumerate(sequence_group) if g < 0])
    return tuple(queue)


def _order_nodes(
    grouping: GroupPlan, lengths: list[int], output_estimates: Sequence[int]
) -> dict[tuple[str, int], OrderNode]:
    """What a policy weighs for every sequence and every group's subtree."""
    nodes: dict[tuple[str, int], OrderNode] = {}
    for i, length in enumerate(lengths):
        nodes["sequence", i] = OrderNode(
            first_arrival=i,
            prefill_tokens=length - grouping.prefix_end_of(i),
            decode_tokens=float(output_estimates[i]),
        )
    for group in reversed(grouping.groups):  # preorder reversed: children before their parent
        parts = [nodes["sequence", i] for i in group.members] + [nodes["group", c] for c in group.children]
        nodes["group", group.group_id] = OrderNode(
            first_arrival=min(p.first_arrival for p in parts),
            prefill_tokens=group.num_prefix_tokens + sum(p.prefill_tokens for p in parts),
            decode_tokens=sum(p.decode_tokens for p in parts),
        )
    return nodes


def _first_sequence(grouping: GroupPlan, group_id: int) -> int:
    """Any sequence under the group: all of them share its prefix tokens."""
    group = grouping.groups[group_id]
    while not group.members:
        group = grouping.groups[group.children[0]]
    return group.members[0]


# -- the warm-up sample ----------------------------------------------------------------------------


def warmup_sample(
    plan: BatchPlan, policy: str, has_unknown_lengths: bool, fraction: float | None = None
) -> list[int]:
    """The sequences to run before the rest of the batch, so that their measured output lengths
    correct the rest's estimates; [] when not worth it (a policy that ignores lengths, lengths
    all exact, a small batch). Systematic over the depth-first order of the plan's groups (every
    k-th sequence), so each subtree holds about `fraction` of its sequences in the sample."""
    if not (uses_output_estimates(policy) and has_unknown_lengths and plan.num_sequences >= WARMUP_MIN_REQUESTS):
        return []
    fraction = WARMUP_FRACTION if fraction is None else fraction
    order = plan.dfs_order()
    count = max(1, round(fraction * len(order)))
    return sorted({order[int((j + 0.5) * len(order) / count)] for j in range(count)})


def rescaled_estimates(
    plan: BatchPlan,
    sample: Sequence[int],
    measured: Sequence[int],
    max_tokens: Sequence[int],
    is_exact: Sequence[bool],
) -> list[int]:
    """Output estimates for every sequence of `plan` once its warm-up `sample` has finished with
    `measured` output tokens each: a sequence's scale is the mean (measured / max_tokens) of the
    sampled sequences in the deepest group above it that has any, else of the whole sample.
    Exact lengths (ignore_eos) stay as they are."""
    by_group: dict[int, list[float]] = {}
    every: list[float] = []
    for sequence, num_output in zip(sample, measured):
        ratio = num_output / max_tokens[sequence]
        every.append(ratio)
        for group in plan.groups_of(sequence):
            by_group.setdefault(group, []).append(ratio)
    if not every:
        return list(max_tokens)
    overall = sum(every) / len(every)
    estimates = []
    for sequence, limit in enumerate(max_tokens):
        if is_exact[sequence]:
            estimates.append(limit)
            continue
        scale = overall
        for group in reversed(plan.groups_of(sequence)):
            if group in by_group:
                scale = sum(by_group[group]) / len(by_group[group])
                break
        estimates.append(max(1, min(limit, round(scale * limit))))
    return estimates
