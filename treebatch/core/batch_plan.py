"""From prompts to a queue: the prefix tree's groups become prefix requests and group members.

`plan_requests` takes the batch's sequences (one Request per sample), cuts their prompts into
groups with the prefix tree, registers each group with the scheduler's GroupManager, and returns
the queue in depth-first plan order: a group's prefix request, its members, then its child groups
(each again prefix first), and the plain requests last. Requests of one group thus run together,
and a group's KV is freed as soon as its subtree is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import num_blocks_for
from treebatch.core.prefix_tree import GroupPlan, PrefixTree, group_prompts
from treebatch.core.request import Request
from treebatch.sampling_params import SamplingParams

_PREFIX_PARAMS = SamplingParams(max_tokens=1)  # never sampled: a prefix request only fills KV


@dataclass(slots=True)
class PlanSummary:
    num_groups: int
    num_unique_tokens: int  # the tree's unique prompt tokens: no plan computes fewer
    num_planned_tokens: int  # prompt tokens this plan computes (the last token of each prompt
    # is always its own, so duplicates and prompt-prefixes cost one token each above the optimum)
    share_histogram: dict[int, int]


def plan_requests(
    requests: list[Request],
    groups: GroupManager,
    block_size: int,
    min_prefix_tokens: int = 16,
    min_share: int = 2,
) -> tuple[list[Request], PlanSummary]:
    tree = PrefixTree.build([r.prompt_token_ids for r in requests])
    plan = group_prompts(tree, min_prefix_tokens=min_prefix_tokens, min_share=min_share)
    queue: list[Request] = []
    base = groups.num_groups  # group ids stay unique across batches of one engine

    def emit(group_id: int) -> None:
        group = plan.groups[group_id]
        first = requests[_first_leaf(plan, group_id)]
        members = [requests[i] for i in group.members]
        parent = None if group.parent is None else base + group.parent
        for member in members:
            member.group_id = base + group_id
        estimate = num_blocks_for(group.prefix_end, block_size) + sum(
            num_blocks_for(m.max_num_tokens - group.prefix_end, block_size) + 1 for m in members
        )
        groups.add_group(
            base + group_id, parent, group.prefix_end, len(members) + len(group.children), estimate
        )
        queue.append(
            Request(
                f"prefix-{base + group_id}",
                first.prompt_token_ids[: group.prefix_end],
                _PREFIX_PARAMS,
                group_id=parent,
                prefix_of=base + group_id,
            )
        )
        queue.extend(members)
        for child in group.children:
            emit(child)

    for group in plan.groups:
        if group.parent is None:
            emit(group.group_id)
    queue.extend(requests[i] for i in range(len(requests)) if plan.prompt_group[i] < 0)
    summary = PlanSummary(
        num_groups=len(plan.groups),
        num_unique_tokens=tree.num_unique_tokens,
        num_planned_tokens=plan.num_computed_tokens,
        share_histogram=dict(plan.share_histogram),
    )
    return queue, summary


def _first_leaf(plan: GroupPlan, group_id: int) -> int:
    """Any prompt under the group: all of them share its prefix tokens."""
    group = plan.groups[group_id]
    while not group.members:
        group = plan.groups[group.children[0]]
    return group.members[0]
