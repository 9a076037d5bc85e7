"""Shard a planned batch across replicas by the prefix tree: whole top-level groups.

A unit is a top-level group with every sequence under it (nested groups included), or a sequence
that starts from no group. A unit stays on one replica, so no prefix is computed on two replicas
(but for a unit larger than a replica's fair share, which is split one level down). Units
are placed longest processing time first (each on the replica with the least load so far),
which keeps the largest load within 4/3 of the best placement. A unit's cost is its predicted
work: the prompt tokens it computes (each group's prefix once) plus its output tokens weighted by
what a decoded token costs against a prefilled one.

`round_robin` is the prefix-blind placement (what splitting rows into blocks does), kept to
measure what prefix-aware sharding saves.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from treebatch.core.plan import BatchPlan

# A decoded token costs about this many prefilled ones (a decode step reads the weights for few
# tokens). A default for when no calibration tells.
DECODE_WEIGHT = 8.0


def shard_units(plan: BatchPlan) -> list[list[int]]:
    """The sequences of each unit: one list per top-level group (its whole subtree), then one per
    sequence outside every group."""
    units = [_subtree(plan, g.group_id) for g in plan.groups if g.parent is None]
    return [u for u in units if u] + [[s] for s, g in enumerate(plan.sequence_group) if g < 0]


def _subtree(plan: BatchPlan, group_id: int) -> list[int]:
    spec = plan.groups[group_id]
    out = list(spec.members)
    for child in spec.children:
        out.extend(_subtree(plan, child))
    return out


def _split(plan: BatchPlan, node: tuple[str, int]) -> list[tuple[str, int]]:
    """A group's subtree as its direct members (one node) and each child group's subtree."""
    kind, group_id = node
    if kind != "group" or not plan.groups[group_id].children:
        return [node]
    spec = plan.groups[group_id]
    return ([("members", group_id)] if spec.members else []) + [("group", c) for c in spec.children]


def _sequences(plan: BatchPlan, node: tuple[str, int]) -> list[int]:
    kind, index = node
    if kind == "group":
        return _subtree(plan, index)
    return list(plan.groups[index].members) if kind == "members" else [index]


def unit_cost(plan: BatchPlan, unit: list[int], prompt_lengths: Sequence[int], output_estimates: Sequence[int],
              decode_weight: float = DECODE_WEIGHT) -> float:
    """Prompt tokens the unit computes (each prefix once) plus weighted output tokens."""
    prefixes: dict[int, int] = {}
    own = 0
    for sequence in unit:
        groups = plan.groups_of(sequence)
        for group_id in groups:
            spec = plan.groups[group_id]
            prefixes[group_id] = spec.prefix_end - spec.prefix_start
        own += prompt_lengths[sequence] - (plan.prefix_end_of(sequence) if groups else 0)
    outputs = sum(output_estimates[s] for s in unit)
    return float(sum(prefixes.values()) + own) + decode_weight * outputs


def shard_plan(
    plan: BatchPlan, prompt_lengths: Sequence[int], output_estimates: Sequence[int], num_replicas: int,
    decode_weight: float = DECODE_WEIGHT,
) -> list[list[int]]:
    """Sequence indices for each of `num_replicas` replicas (ascending within a replica).

    A unit bigger than a replica's fair share (a system prompt over the whole batch) is split
    into its child groups (and its direct members), each of which then computes that one prefix
    again: the only prefix work done twice, and only where one replica would otherwise hold
    more than its share."""
    assert num_replicas >= 1

    def cost(node: tuple[str, int]) -> float:
        return unit_cost(plan, _sequences(plan, node), prompt_lengths, output_estimates, decode_weight)

    nodes = [("group", g.group_id) for g in plan.groups if g.parent is None]
    nodes += [("sequence", s) for s, g in enumerate(plan.sequence_group) if g < 0]
    costs = {node: cost(node) for node in nodes}
    if num_replicas > 1:
        while True:
            share = sum(costs.values()) / num_replicas
            big = max(nodes, key=lambda n: costs[n], default=None)
            if big is None or costs[big] <= share or _split(plan, big) == [big]:
                break
            nodes.remove(big)
            del costs[big]
            for part in _split(plan, big):
                nodes.append(part)
                costs[part] = cost(part)
    loads = [(0.0, replica) for replica in range(num_replicas)]
    shards: list[list[int]] = [[] for _ in range(num_replicas)]
    for node in sorted(nodes, key=lambda n: (-costs[n], n)):
        load, replica = heapq.heappop(loads)
        shards[replica].extend(_sequences(plan, node))
        heapq.heappush(loads, (load + costs[node], replica))
    return [sorted(shard) for shard in shards]


def round_robin(num_sequences: int, num_replicas: int) -> list[list[int]]:
    """Sequence i on replica i mod N: blind to prefixes."""
    return [list(range(replica, num_sequences, num_replicas)) for replica in range(num_replicas)]
