"""The batch-wide prefix tree, and its cut into prefix-sharing groups.

The whole batch is known up front, so every prompt goes into one token-level radix (compressed)
tree before anything runs. `PrefixTree.build` makes it without a Python object per token: the
prompts are sorted lexicographically (as big-endian byte strings, so `bytes` comparison is token
order), the longest common prefix (LCP) of each pair of neighbours in that order is found with
vectorized numpy, and the radix tree follows from the LCP array in one stack pass over the prompts
(the Cartesian-tree construction also used to build suffix trees from suffix arrays). Nodes live
in numpy arrays, O(number of prompts) of them; the tokens stay in one flat array.

`group_prompts` then cuts the tree into `PrefixGroup`s: a shared prefix whose KV is computed once,
and the prompts (members) that continue from it. See its docstring for the rules.

Pure Python + numpy: `treebatch.core` never imports torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Pairs of prompts compared per numpy pass when finding common prefixes, in tokens: bounds the
# temporaries (a few int64 arrays this long) whatever the batch size.
_COMPARE_CHUNK_TOKENS = 1 << 22

# Prompts converted to byte keys per pass while sorting: bounds the big-endian temporary.
_KEY_CHUNK_PROMPTS = 4096


# -- vectorized helpers --------------------------------------------------------------------------


def _common_prefix_lengths(
    tokens: np.ndarray, a_off: np.ndarray, b_off: np.ndarray, limit: np.ndarray
) -> np.ndarray:
    """For each pair k: how many tokens tokens[a_off[k]:] and tokens[b_off[k]:] share, at most limit[k].

    Work is linear in sum(limit); pairs are compared a chunk at a time so memory stays bounded.
    """
    n = len(limit)
    out = np.zeros(n, dtype=np.int64)
    limit = np.asarray(limit, dtype=np.int64)
    ends = np.cumsum(limit)
    start = 0
    while start < n:
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + _COMPARE_CHUNK_TOKENS, side="right"))
        stop = max(stop, start + 1)  # one pair longer than a chunk still goes alone
        out[start:stop] = _common_prefix_chunk(
            tokens, a_off[start:stop], b_off[start:stop], limit[start:stop]
        )
        start = stop
    return out


def _common_prefix_chunk(
    tokens: np.ndarray, a_off: np.ndarray, b_off: np.ndarray, limit: np.ndarray
) -> np.ndarray:
    total = int(limit.sum())
    result = limit.copy()  # pairs without a mismatch share all `limit` tokens
    if total == 0:
        return result
    seg_start = np.cumsum(limit) - limit
    pair = np.repeat(np.arange(len(limit)), limit)
    local = np.arange(total, dtype=np.int64) - seg_start[pair]
    differ = tokens[a_off[pair] + local] != tokens[b_off[pair] + local]
    hits = np.flatnonzero(differ)
    if len(hits):
        # hits ascend, so the first hit of each pair is its first mismatch
        pairs_hit, first = np.unique(pair[hits], return_index=True)
        result[pairs_hit] = local[hits[first]]
    return result


def _sort_prompts(tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Prompt indices in lexicographic token order (a prefix before its extensions).

    Each prompt becomes a bytes key of big-endian uint32 tokens, whose bytewise order is the token
    order; Python's sort then compares keys with memcmp, which is fast even for long shared
    prefixes. Keys are built a chunk of prompts at a time to bound the temporaries.
    """
    keys: list[bytes] = []
    for first in range(0, len(lengths), _KEY_CHUNK_PROMPTS):
        last = min(first + _KEY_CHUNK_PROMPTS, len(lengths))
        lo, hi = int(offsets[first]), int(offsets[last - 1] + lengths[last - 1])
        raw = tokens[lo:hi].astype(">u4").tobytes()
        starts = (offsets[first:last] - lo) * 4
        stops = starts + lengths[first:last] * 4
        keys.extend(raw[s:e] for s, e in zip(starts.tolist(), stops.tolist()))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return np.asarray(order, dtype=np.int64)


@dataclass
class _Radix:
    """A radix tree over prompts in sorted order, from their neighbour LCPs.

    Node 0 is the root (depth 0). Node v covers the sorted positions [lo[v], hi[v]): exactly the
    prompts whose first depth[v] tokens are v's prefix. end_node[i] is the node where sorted
    prompt i ends (several prompts end at one node when they are equal).
    """

    parent: np.ndarray
    depth: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    end_node: np.ndarray
    preorder: np.ndarray  # node ids, every parent before its children, children in sorted order

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def leaves(self) -> np.ndarray:
        return self.hi - self.lo

    def num_ends(self) -> np.ndarray:
        return np.bincount(self.end_node, minlength=self.num_nodes)


def _radix_from_lcp(end_depth: np.ndarray, lcp: np.ndarray) -> _Radix:
    """Build the radix tree of sorted strings with lengths end_depth and neighbour LCPs lcp.

    lcp[i] is the LCP of sorted strings i-1 and i (lcp[0] unused). The stack holds the path to
    the previous string's end; string i pops the nodes deeper than lcp[i], splits an edge where
    it branches off mid-edge, and hangs its own end below. Linear in the number of strings.
    Correct for any order in which each subtree is contiguous and the LCP of two strings is the
    minimum of the neighbour LCPs between them (true for lexicographic order).
    """
    n = len(end_depth)
    parent, depth, lo, hi = [-1], [0], [0], [n]
    end_node = np.empty(n, dtype=np.int64)
    stack = [0]
    ends = end_depth.tolist()
    lcps = lcp.tolist()
    for i in range(n):
        if i:
            common = lcps[i]
            popped = -1
            while depth[stack[-1]] > common:
                popped = stack.pop()
                hi[popped] = i
            if depth[stack[-1]] < common:
                # string i leaves the popped node's edge part way: split the edge there
                node = len(parent)
                parent.append(stack[-1])
                depth.append(common)
                lo.append(lo[popped])
                hi.append(n)
                parent[popped] = node
                stack.append(node)
        if depth[stack[-1]] < ends[i]:
            node = len(parent)
            parent.append(stack[-1])
            depth.append(ends[i])
            lo.append(i)
            hi.append(n)
            stack.append(node)
        end_node[i] = stack[-1]
    for node in stack:
        hi[node] = n
    lo_a, depth_a = np.asarray(lo, dtype=np.int64), np.asarray(depth, dtype=np.int64)
    # Nodes sharing a first position form an ancestor chain, so (lo, depth) order is preorder.
    preorder = np.lexsort((depth_a, lo_a))
    return _Radix(
        np.asarray(parent, dtype=np.int64), depth_a, lo_a, np.asarray(hi, dtype=np.int64),
        end_node, preorder,
    )


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(values[lo[k]:hi[k]]) for nonempty ranges, through a sparse table (O(n log n) memory)."""
    table = [values]
    width = 1
    while 2 * width <= len(values):
        prev = table[-1]
        table.append(np.minimum(prev[:-width], prev[width:]))
        width *= 2
    size = hi - lo
    level = np.floor(np.log2(np.maximum(size, 1))).astype(np.int64)
    out = np.empty(len(lo), dtype=values.dtype)
    for k in np.unique(level).tolist():
        sel = level == k
        row = table[k]
        out[sel] = np.minimum(row[lo[sel]], row[hi[sel] - (1 << k)])
    return out


# -- the tree ------------------------------------------------------------------------------------


class PrefixTree:
    """Token-level radix tree of a whole batch of prompts (see the module docstring).

    Prompts are referred to by their index in the batch. Public arrays (read-only by convention):
    `tokens` (all prompts concatenated, int32), `offsets`, `lengths`, `order` (prompt indices in
    lexicographic order), `lcp` (lcp[i]: tokens shared by order[i-1] and order[i]), and the nodes
    `node_parent`, `node_depth` (prefix length), `node_lo`/`node_hi` (the node's prompts are
    order[lo:hi]) and `prompt_node` (the node where each prompt ends).
    """

    def __init__(
        self, tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray,
        lcp: np.ndarray,
    ) -> None:
        self.tokens = tokens
        self.offsets = offsets
        self.lengths = lengths
        self.order = order
        self.lcp = lcp
        radix = _radix_from_lcp(lengths[order], lcp)
        self._radix = radix
        self.node_parent = radix.parent
        self.node_depth = radix.depth
        self.node_lo = radix.lo
        self.node_hi = radix.hi
        self.prompt_node = np.empty(len(lengths), dtype=np.int64)
        self.prompt_node[order] = radix.end_node
        self.num_prompts = len(lengths)
        self.num_logical_tokens = int(lengths.sum())
        # Every token position in the tree is a prefix of some prompt not already counted by its
        # lexicographic predecessor: the classic distinct-prefix count.
        self.num_unique_tokens = self.num_logical_tokens - int(lcp[1:].sum())

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int] | np.ndarray]) -> PrefixTree:
        """Build the tree of `prompts` (token-id sequences, each at least one token long)."""
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        if len(lengths) and lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        tokens = cls._flatten(prompts)
        offsets = np.cumsum(lengths) - lengths
        order = _sort_prompts(tokens, offsets, lengths)
        lcp = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            prev, cur = order[:-1], order[1:]
            limit = np.minimum(lengths[prev], lengths[cur])
            lcp[1:] = _common_prefix_lengths(tokens, offsets[prev], offsets[cur], limit)
        return cls(tokens, offsets, lengths, order, lcp)

    @staticmethod
    def _flatten(prompts: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        if not len(prompts):
            return np.zeros(0, dtype=np.int32)
        flat = np.concatenate([np.asarray(p).reshape(-1) for p in prompts])
        if flat.dtype.kind not in "iu":
            if flat.size and not np.array_equal(flat, flat.astype(np.int64)):
                raise ValueError("token ids must be integers")
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
            raise ValueError("token ids must lie in [0, 2**31)")
        return flat.astype(np.int32, copy=False)

    # -- access ----------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return self._radix.num_nodes

    def prompt_tokens(self, prompt: int) -> np.ndarray:
        """The prompt's token ids (a view into `tokens`)."""
        start = int(self.offsets[prompt])
        return self.tokens[start : start + int(self.lengths[prompt])]

    def node_tokens(self, node: int) -> np.ndarray:
        """The node's whole prefix (root to node), a view into `tokens`."""
        return self.prompt_tokens(int(self.order[self.node_lo[node]]))[: int(self.node_depth[node])]

    def node_leaves(self, node: int) -> int:
        """Prompts that have the node's prefix (duplicates counted)."""
        return int(self.node_hi[node] - self.node_lo[node])

    def children(self, node: int) -> list[int]:
        """Child nodes in lexicographic order (a scan; for tests and inspection, not hot paths)."""
        kids = np.flatnonzero(self.node_parent == node)
        return kids[np.argsort(self.node_lo[kids], kind="stable")].tolist()

    # -- checks ----------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert that the order, LCPs and nodes describe exactly these prompts' radix tree.

        Linear in the tokens (the order and LCPs are re-verified against the tokens) plus
        O(n log n) for the per-node range checks.
        """
        n = self.num_prompts
        assert sorted(self.order.tolist()) == list(range(n)), "order is not a permutation"
        self._check_order_and_lcp()
        self._check_nodes()

    def _check_order_and_lcp(self) -> None:
        if self.num_prompts < 2:
            return
        prev, cur = self.order[:-1], self.order[1:]
        len_prev, len_cur = self.lengths[prev], self.lengths[cur]
        limit = np.minimum(len_prev, len_cur)
        common = _common_prefix_lengths(self.tokens, self.offsets[prev], self.offsets[cur], limit)
        assert np.array_equal(common, self.lcp[1:]), "stored LCPs do not match the tokens"
        branch = common < limit
        at_prev = self.tokens[self.offsets[prev][branch] + common[branch]]
        at_cur = self.tokens[self.offsets[cur][branch] + common[branch]]
        assert np.all(at_prev < at_cur), "prompts are not in lexicographic order"
        assert np.all(len_prev[~branch] <= len_cur[~branch]), "a prefix sorts after its extension"

    def _check_nodes(self) -> None:
        n, radix = self.num_prompts, self._radix
        parent, depth, lo, hi = radix.parent, radix.depth, radix.lo, radix.hi
        assert parent[0] == -1 and depth[0] == 0 and lo[0] == 0 and hi[0] == n
        assert radix.num_nodes <= 2 * n + 1, "more nodes than a radix tree can have"
        kids = np.arange(1, radix.num_nodes)
        par = parent[kids]
        assert np.all((par >= 0) & (par < radix.num_nodes))
        assert np.all(depth[par] < depth[kids]), "a child is not deeper than its parent"
        assert np.all((lo[par] <= lo[kids]) & (hi[kids] <= hi[par]) & (lo[kids] < hi[kids]))
        # Each node's range is exactly the prompts with its prefix: all pairs inside share at
        # least depth tokens (and exactly depth somewhere, or the node would be deeper), and the
        # neighbours just outside share fewer.
        wide = kids[hi[kids] - lo[kids] >= 2]
        if len(wide):
            inner = _range_min(self.lcp, lo[wide] + 1, hi[wide])
            assert np.array_equal(inner, depth[wide]), "a node's prompts do not share exactly its prefix"
        left = kids[lo[kids] > 0]
        assert np.all(self.lcp[lo[left]] < depth[left]), "a node's range misses a prompt on the left"
        right = kids[hi[kids] < n]
        assert np.all(self.lcp[hi[right]] < depth[right]), "a node's range misses a prompt on the right"
        ends = radix.num_ends()
        num_kids = np.bincount(par, minlength=radix.num_nodes)
        unary = (ends == 0) & (num_kids < 2)
        unary[0] = False
        assert not unary.any(), "a node with one child and no prompt ending there is not compressed"
        end = self.prompt_node
        assert np.array_equal(depth[end], self.lengths), "a prompt does not end at its length"
        pos = np.empty(n, dtype=np.int64)
        pos[self.order] = np.arange(n)
        assert np.all((lo[end] <= pos) & (pos < hi[end])), "a prompt lies outside its end node"
        # Ranges partition: a node's prompts are its ends plus its children's prompts.
        child_total = np.bincount(par, weights=hi[kids] - lo[kids], minlength=radix.num_nodes)
        assert np.array_equal(child_total.astype(np.int64) + ends, hi - lo), "ranges do not partition"


# -- groups --------------------------------------------------------------------------------------


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
    tree: PrefixTree, min_prefix_tokens: int = 16, min_share: int = 2, nested: bool = True
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
