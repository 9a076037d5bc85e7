"""The batch-wide prefix tree cut into prefix-sharing groups.

`group_prompts` cuts a `PrefixTree` (treebatch.core.prefix_tree) into `PrefixGroup`s: a shared
prefix whose KV is computed once, and the prompts (members) that continue from it. See its
docstring for the rules.

Pure Python + numpy: `treebatch.core` never imports torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from treebatch.core.prefix_tree import PrefixTree, _Radix, _radix_from_lcp


@dataclass
class PrefixGroup:
    """Prompts sharing a prefix whose KV is computed once.

    The group's own prefix is token positions [prefix_start, prefix_end) of every prompt under it;
    positions before prefix_start belong to the parent group (its KV is extended, not copied).
    """

    group_id: int
    parent: int | None
    prefix_start: int
    prefix_end: int
    members: list[int]  # prompts whose own suffix hangs directly off this group, in token order
    children: list[int] = field(default_factory=list)
    num_leaves: int = 0  # prompts under the group: members plus the children's, recursively
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32), repr=False)
    depth: int = 0  # nesting level: 0 for a root group

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens this group computes itself (its part of the prefix)."""
        return self.prefix_end - self.prefix_start


@dataclass
class GroupPlan:
    groups: list[PrefixGroup]  # depth-first preorder: parents before children
    prompt_group: np.ndarray  # prompt -> its deepest group, or -1 for a plain request
    num_computed_tokens: int  # each group's own prefix once, plus each prompt's remaining suffix
    share_histogram: dict[int, int]  # num_leaves -> number of groups
    nested: bool = True

    def groups_of(self, prompt: int) -> list[int]:
        """Root-to-leaf chain of group ids containing the prompt ([] for a plain request)."""
        chain = []
        group = int(self.prompt_group[prompt])
        while group >= 0:
            chain.append(group)
            parent = self.groups[group].parent
            group = -1 if parent is None else parent
        return chain[::-1]

    def prefix_end_of(self, prompt: int) -> int:
        """Prompt tokens covered by its groups' prefixes (0 for a plain request)."""
        group = int(self.prompt_group[prompt])
        return self.groups[group].prefix_end if group >= 0 else 0

    def dfs_order(self) -> list[int]:
        """Prompts in depth-first group order: a group's members together, right before the
        members of its child groups; plain requests last, in token order."""
        # Groups are listed in preorder, so concatenating members group by group is the DFS.
        order = [p for group in self.groups for p in group.members]
        order.extend(np.flatnonzero(self.prompt_group < 0).tolist())
        return order

    @property
    def num_grouped_prompts(self) -> int:
        return int(np.count_nonzero(self.prompt_group >= 0))

    def check_integrity(self, tree: PrefixTree) -> None:
        """Assert the plan is consistent and every prefix is really shared (tokens compared)."""
        assert len(self.prompt_group) == tree.num_prompts
        seen = np.zeros(tree.num_prompts, dtype=np.int64)
        for g in self.groups:
            self._check_group(tree, g, seen)
        plain = self.prompt_group < 0
        assert np.all(seen[~plain] == 1) and np.all(seen[plain] == 0), "members do not partition"
        recount = sum(g.num_prefix_tokens for g in self.groups)
        recount += sum(int(tree.lengths[p]) - self.prefix_end_of(p) for p in range(tree.num_prompts))
        assert recount == self.num_computed_tokens, "num_computed_tokens does not add up"

    def _check_group(self, tree: PrefixTree, g: PrefixGroup, seen: np.ndarray) -> None:
        assert self.groups[g.group_id] is g
        if g.parent is None:
            assert g.prefix_start == 0 and g.depth == 0
        else:
            parent = self.groups[g.parent]
            assert self.nested and g.parent < g.group_id and g.group_id in parent.children
            assert g.prefix_start == parent.prefix_end and g.depth == parent.depth + 1
        assert g.prefix_start < g.prefix_end
        assert g.num_leaves == len(g.members) + sum(self.groups[c].num_leaves for c in g.children)
        for p in g.members:
            assert self.prompt_group[p] == g.group_id
            seen[p] += 1
        # Every prompt under the group has the group's tokens and keeps its last token for itself.
        for p in self._leaves(g):
            tokens = tree.prompt_tokens(p)
            assert len(tokens) > g.prefix_end, "a group prefix covers a member's last token"
            assert np.array_equal(tokens[g.prefix_start : g.prefix_end], g.token_ids)

    def _leaves(self, g: PrefixGroup) -> list[int]:
        out = list(g.members)
        for c in g.children:
            out.extend(self._leaves(self.groups[c]))
        return out


def group_prompts(
    tree: PrefixTree, min_prefix_tokens: int, min_share: int = 2, nested: bool = True
) -> GroupPlan:
    """Cut the batch into prefix-sharing groups.

    The last-token rule. A prompt's last token must run in the prompt's own forward pass (its
    logits sample the first output token), so no group prefix may cover a whole prompt. Groups
    are therefore cut from the radix tree of every prompt *minus its last token* (the "shareable
    tree"): a node where a prompt ends in the full tree is, in effect, split one token early, the
    prompt hangs off the split as a member, and the last token is computed privately. n equal
    prompts (n samples of one prompt) thus make one group with prefix prompt[:-1] whose n members
    compute one token each. The shareable tree is built from the full tree's order and LCPs,
    clipped to len-1, without touching tokens.

    Nested groups (the default, `nested=True`): a child group's KV extends its parent's, so a
    node of the shareable tree costs nothing extra to make a group: computing its own prefix once
    instead of once per prompt under it saves (leaves - 1) * own_tokens >= 0. Every node becomes a
    group, top-down, if at least `min_share` prompts lie under it and its own part of the prefix
    (from the nearest group above) has at least `min_prefix_tokens` tokens; a node too short is
    folded into the group(s) below it (their prefix starts at the group above), prompts of a node
    that is not a group become members of the group above, or plain requests (group -1) at the
    top. With min_prefix_tokens=1 and min_share=2 every shared position is computed once:
    num_computed_tokens == unique tokens of the shareable tree + num_prompts
                        == tree.num_unique_tokens + num_prompts - (distinct prompts that are not a
                           proper prefix of another prompt, i.e. leaf nodes of the full tree).

    Flat groups (`nested=False`): BatchLLM's single-level groups, with its prefix-enlarging rule.
    Each group's prefix runs from token 0 and is computed once per group, so splitting costs
    recomputation. Bottom-up, for a candidate group at node c and a child g: keeping g's prompts
    in c's group makes each compute g's edge of len(g) tokens; hoisting g to a group of its own
    computes c's prefix again plus the edge once. Hoisting therefore gains
        (leaves(g) - 1) * len(g) - depth(c)
    for a g without deeper groups (in general: g's cost inside c minus g's best cost as a group of
    its own, computed bottom-up first). g is hoisted when that gain is positive; if every child of
    c is hoisted and no prompt ends at c, c is dropped ("forked" into its children), which
    refunds depth(c); prompts ending at a forked node run plain. Nodes with fewer than
    `min_share` prompts or a prefix shorter than `min_prefix_tokens` cannot be groups, but a short
    one can still be forked, so a 1-token node (a shared BOS) does not hide the groups below it.
    This is an exact dynamic program over the choice "each child stays inside its parent's group
    or is split off (kept as a group, or forked)", linear in the nodes.

    Worked example: a 100-token system prompt S, two documents D1, D2 and three 20-token
    questions per document (prompt-final tokens ignored for the arithmetic; no sharing would
    compute 6 * (100 + d + 20) tokens).
      * d = 400: hoisting D1 out of S's group gains (3 - 1) * 400 - 100 = 700 > 0, likewise D2;
        S is then empty and dropped. Flat: groups S+D1, S+D2 (500 tokens each), 6 * 20 private:
        1120 tokens. Nested: S (100) -> D1 (400), D2 (400), 6 * 20 private: 1020 = unique tokens.
      * d = 40: hoisting one document alone gains 2 * 40 - 100 = -20 < 0, but hoisting both
        forks S away: 2 * 140 + 6 * 20 = 400 < 100 + 6 * 60 = 460 for S with six members, so
        flat groups are S+D1, S+D2. Nested: S -> D1, D2 again (100 + 80 + 120 = 300).
    """
    if min_prefix_tokens < 1 or min_share < 1:
        raise ValueError("min_prefix_tokens and min_share must be at least 1")
    shareable = _shareable_tree(tree)
    if nested:
        is_group, anchor = _choose_nested(shareable, min_prefix_tokens, min_share)
    else:
        is_group, anchor = _choose_flat(tree, shareable, min_prefix_tokens, min_share)
    return _make_plan(tree, shareable, is_group, anchor, nested)


def _shareable_tree(tree: PrefixTree) -> _Radix:
    """Radix tree of every prompt minus its last token, over the full tree's sorted order.

    Clipping both strings of a neighbour pair to len-1 keeps each subtree contiguous in that
    order and the range-minimum property of the LCPs (any prompt between two others is at least
    as long as their common prefix, or equal to the smaller one), so the stack pass still holds.
    """
    ends = tree.lengths[tree.order] - 1
    lcp = tree.lcp.copy()
    if len(lcp) > 1:
        lcp[1:] = np.minimum(lcp[1:], np.minimum(ends[:-1], ends[1:]))
    return _radix_from_lcp(ends, lcp)


def _choose_nested(
    radix: _Radix, min_prefix_tokens: int, min_share: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-down: a node is a group if shared enough and its own part of the prefix is long enough.

    Returns is_group per node and anchor per node: the group whose prefix a node's ending prompts
    continue from (the node itself if it is a group, else the nearest group above, -1 if none).
    """
    parent, depth, leaves = radix.parent.tolist(), radix.depth.tolist(), radix.leaves.tolist()
    is_group = [False] * radix.num_nodes
    anchor = [-1] * radix.num_nodes
    for v in radix.preorder.tolist()[1:]:  # the root (depth 0) is never a group
        above = anchor[parent[v]]
        start = depth[above] if above >= 0 else 0
        if leaves[v] >= min_share and depth[v] - start >= min_prefix_tokens:
            is_group[v] = True
            anchor[v] = v
        else:
            anchor[v] = above
    return np.asarray(is_group, dtype=bool), np.asarray(anchor, dtype=np.int64)


def _choose_flat(
    tree: PrefixTree, radix: _Radix, min_prefix_tokens: int, min_share: int
) -> tuple[np.ndarray, np.ndarray]:
    """BatchLLM prefix enlarging as an exact bottom-up program (see group_prompts)."""
    n_nodes = radix.num_nodes
    depth = radix.depth.tolist()
    parent = radix.parent.tolist()
    # private[v]: shareable tokens the prompts under v compute beyond v's parent if v is not split
    # off: sum of (len - 1) over them minus leaves * depth(parent)
    shareable_len = np.concatenate([[0], np.cumsum(tree.lengths[tree.order] - 1)])
    total_len = shareable_len[radix.hi] - shareable_len[radix.lo]
    parent_depth = radix.depth[np.maximum(radix.parent, 0)]
    private = (total_len - radix.leaves * parent_depth).tolist()
    eligible = ((radix.leaves >= min_share) & (radix.depth >= min_prefix_tokens)).tolist()
    eligible[0] = False
    ends = radix.num_ends().tolist()
    inf = float("inf")
    keep_cost = [0] * n_nodes  # v stays a group: its prefix once, each child inside or hoisted
    fork_cost = [0] * n_nodes  # v is no group: every child hoisted, prompts ending at v plain
    best = [0] * n_nodes  # cost of v's subtree when v is split off from the group above
    forked = [False] * n_nodes
    for v in reversed(radix.preorder.tolist()):
        keep = keep_cost[v] + depth[v] if eligible[v] else inf
        fork = fork_cost[v] + ends[v] * depth[v]
        forked[v] = fork <= keep  # on a tie, fewer groups
        best[v] = min(keep, fork)
        if v:
            keep_cost[parent[v]] += min(private[v], best[v])
            fork_cost[parent[v]] += best[v]
    return _extract_flat(radix, eligible, private, best, forked)


def _extract_flat(
    radix: _Radix, eligible: list[bool], private: list[int], best: list[float], forked: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-down: replay the choices of the bottom-up program into groups and anchors."""
    parent = radix.parent.tolist()
    is_group = [False] * radix.num_nodes
    anchor = [-1] * radix.num_nodes
    # split[v]: v heads a group of its own (kept, or forked into its children)
    split = [False] * radix.num_nodes
    split[0] = True  # the root is the "plain" pseudo-group: its children choose against it
    for v in radix.preorder.tolist()[1:]:
        p = parent[v]
        if split[p] and (forked[p] or best[v] < private[v]):
            split[v] = True
            is_group[v] = not forked[v]
            anchor[v] = v if is_group[v] else -1  # a forked node's own prompts run plain
        else:
            anchor[v] = p if is_group[p] else anchor[p]
    return np.asarray(is_group, dtype=bool), np.asarray(anchor, dtype=np.int64)


def _make_plan(
    tree: PrefixTree, radix: _Radix, is_group: np.ndarray, anchor: np.ndarray, nested: bool
) -> GroupPlan:
    nodes = [v for v in radix.preorder.tolist() if is_group[v]]  # preorder: parents first
    group_of_node = np.full(radix.num_nodes, -1, dtype=np.int64)
    group_of_node[nodes] = np.arange(len(nodes))
    owner = np.where(anchor >= 0, group_of_node[np.maximum(anchor, 0)], -1)
    sorted_group = owner[radix.end_node]  # per sorted position
    prompt_group = np.empty(tree.num_prompts, dtype=np.int64)
    prompt_group[tree.order] = sorted_group
    members = _members_by_group(tree.order, sorted_group, len(nodes))
    groups = []
    for gid, v in enumerate(nodes):
        up = int(owner[radix.parent[v]]) if nested else -1
        parent = None if up < 0 else up
        start = groups[up].prefix_end if parent is not None else 0
        end = int(radix.depth[v])
        rep = tree.prompt_tokens(int(tree.order[radix.lo[v]]))
        groups.append(
            PrefixGroup(
                gid, parent, start, end, members[gid], [],
                int(radix.hi[v] - radix.lo[v]) if nested else len(members[gid]),
                rep[start:end], 0 if parent is None else groups[up].depth + 1,
            )
        )
        if parent is not None:
            groups[up].children.append(gid)
    computed = sum(g.num_prefix_tokens for g in groups)
    covered = np.array([g.prefix_end for g in groups] + [0], dtype=np.int64)[prompt_group]
    computed += int((tree.lengths - covered).sum())
    histogram = dict(sorted(Counter(g.num_leaves for g in groups).items()))
    return GroupPlan(groups, prompt_group, computed, histogram, nested)


def _members_by_group(order: np.ndarray, sorted_group: np.ndarray, num_groups: int) -> list[list[int]]:
    """Prompts of each group in token order (a stable sort keeps the sorted order within)."""
    by_group = np.argsort(sorted_group, kind="stable")
    bounds = np.searchsorted(sorted_group[by_group], np.arange(num_groups + 1) - 0.5)
    prompts = order[by_group]
    return [prompts[bounds[g] : bounds[g + 1]].tolist() for g in range(num_groups)]
