"""From prompts to a queue: the prefix tree's groups become prefix requests and group members.

`plan_requests` takes the batch's sequences (one Request per sample), cuts their prompts into
groups with the prefix tree, registers each group with the scheduler's GroupManager, and returns
the queue in depth-first order: a group's prefix request, then its members and child groups
(each again prefix first). Requests of one group thus run together, and a group's KV is freed
as soon as its subtree is done. The order policy (core/policies.py) picks the order of siblings:
the root groups and plain requests, and the members and child groups inside each group; `dfs`
keeps tree order (members, then child groups; plain requests last).
"""

from __future__ import annotations

from dataclasses import dataclass

from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import num_blocks_for
from treebatch.core.grouping import GroupPlan, group_prompts
from treebatch.core.policies import OrderNode, order_siblings
from treebatch.core.prefix_tree import PrefixTree
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
    order_policy: str = "dfs",
) -> tuple[list[Request], PlanSummary]:
    tree = PrefixTree.build([r.prompt_token_ids for r in requests])
    plan = group_prompts(tree, min_prefix_tokens=min_prefix_tokens, min_share=min_share)
    queue: list[Request] = []
    base = groups.num_groups  # group ids stay unique across batches of one engine
    nodes = _order_nodes(plan, requests)

    def emit(group_id: int) -> None:
        group = plan.groups[group_id]
        first = requests[_first_leaf(plan, group_id)]
        members = [requests[i] for i in group.members]
        parent = None if group.parent is None else base + group.parent
        for member in members:
            member.group_id = base + group_id
        estimate = num_blocks_for(group.prefix_end, block_size) + sum(
            num_blocks_for(m.estimated_num_tokens - group.prefix_end, block_size) + 1 for m in members
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
        emit_siblings([("request", i) for i in group.members] + [("group", c) for c in group.children])

    def emit_siblings(siblings: list[tuple[str, int]]) -> None:
        for position in order_siblings([nodes[s] for s in siblings], order_policy):
            kind, index = siblings[position]
            if kind == "group":
                emit(index)
            else:
                queue.append(requests[index])

    roots = [("group", g.group_id) for g in plan.groups if g.parent is None]
    emit_siblings(roots + [("request", i) for i in range(len(requests)) if plan.prompt_group[i] < 0])
    summary = PlanSummary(
        num_groups=len(plan.groups),
        num_unique_tokens=tree.num_unique_tokens,
        num_planned_tokens=plan.num_computed_tokens,
        share_histogram=dict(plan.share_histogram),
    )
    return queue, summary


def _order_nodes(plan: GroupPlan, requests: list[Request]) -> dict[tuple[str, int], OrderNode]:
    """What a policy weighs for every request and every group's subtree."""
    nodes: dict[tuple[str, int], OrderNode] = {}
    for i, request in enumerate(requests):
        nodes["request", i] = OrderNode(
            first_arrival=i,
            prefill_tokens=request.num_prompt_tokens - plan.prefix_end_of(i),
            decode_tokens=float(request.estimated_output_tokens),
        )
    for group in reversed(plan.groups):  # preorder reversed: children before their parent
        parts = [nodes["request", i] for i in group.members] + [nodes["group", c] for c in group.children]
        nodes["group", group.group_id] = OrderNode(
            first_arrival=min(p.first_arrival for p in parts),
            prefill_tokens=group.num_prefix_tokens + sum(p.prefill_tokens for p in parts),
            decode_tokens=sum(p.decode_tokens for p in parts),
        )
    return nodes


def _first_leaf(plan: GroupPlan, group_id: int) -> int:
    """Any prompt under the group: all of them share its prefix tokens."""
    group = plan.groups[group_id]
    while not group.members:
        group = plan.groups[group.children[0]]
    return group.members[0]
