"""The batch-wide prefix tree.

The whole batch is known up front, so every prompt goes into one token-level radix (compressed)
tree before anything runs. `PrefixTree.build` makes it without a Python object per token: the
prompts are sorted lexicographically (as big-endian byte strings, so `bytes` comparison is token
order), the longest common prefix (LCP) of each pair of neighbours in that order is found with
vectorized numpy, and the radix tree follows from the LCP array in one stack pass over the prompts
(the Cartesian-tree construction also used to build suffix trees from suffix arrays). Nodes live
in numpy arrays, O(number of prompts) of them; the tokens stay in one flat array.

Its cut into prefix-sharing groups is `treebatch.core.grouping`.

Pure Python + numpy: `treebatch.core` never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
