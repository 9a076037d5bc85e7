"""Prefix tree and groups: hand-made trees, brute-force counts on random batches, and scale."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from treebatch.core.grouping import group_prompts
from treebatch.core.prefix_tree import PrefixTree

MIN_PREFIX = 16  # a group needs this many tokens of its own (the tests' fixed choice)

# -- helpers -------------------------------------------------------------------------------------


def seq(start: int, length: int) -> list[int]:
    """`length` distinct tokens from `start`: segments with disjoint starts never share a token."""
    return list(range(start, start + length))


def brute_unique_tokens(prompts: list[list[int]]) -> int:
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


def leaf_strings(prompts: list[list[int]]) -> int:
    """Distinct prompts that are not a proper prefix of another prompt."""
    distinct = {tuple(p) for p in prompts}
    proper = {tuple(p[:k]) for p in prompts for k in range(1, len(p))}
    return len(distinct - proper)


def recount(tree: PrefixTree, plan) -> int:
    """Computed tokens from the groups alone: each group's own prefix once, each prompt the rest."""
    total = sum(g.prefix_end - g.prefix_start for g in plan.groups)
    for p in range(tree.num_prompts):
        chain = plan.groups_of(p)
        covered = plan.groups[chain[-1]].prefix_end if chain else 0
        total += int(tree.lengths[p]) - covered
    return total


def summary(plan) -> list[tuple]:
    return [(g.parent, g.prefix_start, g.prefix_end, g.members, g.children, g.num_leaves) for g in plan.groups]


def random_batch(rng: random.Random) -> list[list[int]]:
    """A few prompts over a tiny vocabulary, often built from shared stems, so sharing happens."""
    vocab = rng.randint(1, 3)
    stems = [[rng.randrange(vocab) for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(1, 3))]
    prompts = []
    for _ in range(rng.randint(1, 8)):
        tail = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
        prompt = rng.choice(stems) + tail
        prompts.append(prompt or [rng.randrange(vocab)])
    if rng.random() < 0.3:
        prompts.append(list(rng.choice(prompts)))  # a duplicate
    return prompts


SYSTEM, DOCS, QUESTIONS = seq(1000, 30), [seq(2000, 40), seq(3000, 50)], 3


def system_doc_question_batch() -> list[list[int]]:
    """System prompt -> 2 documents -> 3 questions each (questions 5 + i tokens)."""
    return [SYSTEM + doc + seq(5000 + 100 * (3 * d + q), 5 + q) for d, doc in enumerate(DOCS) for q in range(QUESTIONS)]


# -- the tree ------------------------------------------------------------------------------------


def test_core_prefix_tree_does_not_import_torch():
    code = "import treebatch.core.prefix_tree, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tree_of_system_documents_questions():
    prompts = system_doc_question_batch()
    tree = PrefixTree.build(prompts)
    tree.check_integrity()
    assert tree.num_prompts == 6
    assert tree.num_logical_tokens == sum(map(len, prompts))
    assert tree.num_unique_tokens == 30 + 40 + 50 + 2 * (5 + 6 + 7)
    # root -> system -> {doc 1, doc 2} -> 3 question leaves each
    assert tree.num_nodes == 1 + 1 + 2 + 6
    (system,) = tree.children(0)
    assert tree.node_depth[system] == 30 and tree.node_leaves(system) == 6
    assert tree.node_tokens(system).tolist() == SYSTEM
    docs = tree.children(system)
    assert [int(tree.node_depth[d]) for d in docs] == [70, 80]
    assert [len(tree.children(d)) for d in docs] == [3, 3]
    assert tree.prompt_node.tolist() == [c for d in docs for c in tree.children(d)]


def test_tree_of_duplicates_and_prefix_prompts():
    a = seq(10, 6)
    prompts = [a, a[:3], a, a + [99], a[:3]]
    tree = PrefixTree.build(prompts)
    tree.check_integrity()
    assert tree.num_unique_tokens == 7
    # root -> a[:3] (2 end) -> a (2 end) -> a + [99] (1 end)
    assert tree.num_nodes == 4
    assert tree.prompt_node[0] == tree.prompt_node[2] != tree.prompt_node[1] == tree.prompt_node[4]
    assert tree.order.tolist()[:2] in ([1, 4], [4, 1])


def test_tree_edge_cases():
    empty = PrefixTree.build([])
    empty.check_integrity()
    assert (empty.num_prompts, empty.num_unique_tokens, empty.num_nodes) == (0, 0, 1)
    assert group_prompts(empty, MIN_PREFIX).groups == []
    single = PrefixTree.build([[7]])
    single.check_integrity()
    assert (single.num_unique_tokens, single.num_nodes) == (1, 2)
    with pytest.raises(ValueError):
        PrefixTree.build([[1, 2], []])
    with pytest.raises(ValueError):
        PrefixTree.build([[1, -2]])
    arrays = PrefixTree.build([np.array([3, 4], dtype=np.int64), np.array([3, 5], dtype=np.int32), (3,)])
    arrays.check_integrity()
    assert arrays.num_unique_tokens == 3


def test_unique_tokens_match_brute_force_on_random_batches():
    rng = random.Random(1234)
    for _ in range(600):
        prompts = random_batch(rng)
        tree = PrefixTree.build(prompts)
        tree.check_integrity()
        assert tree.num_unique_tokens == brute_unique_tokens(prompts), prompts
        assert tree.num_logical_tokens == sum(map(len, prompts))


def test_integrity_check_catches_a_broken_tree():
    tree = PrefixTree.build([[1, 2, 3], [1, 2, 4], [5]])
    tree.lcp[1] += 1
    with pytest.raises(AssertionError):
        tree.check_integrity()


# -- groups --------------------------------------------------------------------------------------


def test_nested_groups_system_documents_questions():
    tree = PrefixTree.build(system_doc_question_batch())
    plan = group_prompts(tree, min_prefix_tokens=16, min_share=2)
    plan.check_integrity(tree)
    assert summary(plan) == [
        (None, 0, 30, [], [1, 2], 6),
        (0, 30, 70, [0, 1, 2], [], 3),
        (0, 30, 80, [3, 4, 5], [], 3),
    ]
    assert plan.groups[1].token_ids.tolist() == DOCS[0] and plan.groups[1].depth == 1
    assert plan.prompt_group.tolist() == [1, 1, 1, 2, 2, 2]
    assert plan.groups_of(4) == [0, 2]
    assert plan.num_computed_tokens == tree.num_unique_tokens == recount(tree, plan)
    assert plan.share_histogram == {3: 2, 6: 1}
    assert plan.dfs_order() == [0, 1, 2, 3, 4, 5]


def test_nested_groups_fold_short_segments_and_small_shares():
    tree = PrefixTree.build(system_doc_question_batch())
    # 41 tokens: documents' own 40/50-token segments are too short for the first, and the
    # system prompt's 30 too, so it folds into the documents' groups.
    plan = group_prompts(tree, min_prefix_tokens=41)
    plan.check_integrity(tree)
    assert summary(plan) == [(None, 0, 70, [0, 1, 2], [], 3), (None, 0, 80, [3, 4, 5], [], 3)]
    # Shares of 4 or more: only the system prompt is a group; everything else is its member.
    plan = group_prompts(tree, MIN_PREFIX, min_share=4)
    assert summary(plan) == [(None, 0, 30, [0, 1, 2, 3, 4, 5], [], 6)]
    assert plan.num_computed_tokens == recount(tree, plan) == 30 + 40 * 3 + 50 * 3 + 2 * (5 + 6 + 7)


def test_duplicates_group_all_but_the_last_token():
    prompt = seq(100, 20)
    tree = PrefixTree.build([prompt] * 4)
    plan = group_prompts(tree, MIN_PREFIX)
    plan.check_integrity(tree)
    assert summary(plan) == [(None, 0, 19, [0, 1, 2, 3], [], 4)]
    assert plan.num_computed_tokens == 19 + 4


def test_prompt_that_is_a_prefix_of_others_keeps_its_last_token():
    base = seq(100, 20)
    prompts = [base + seq(500, 5), base, base + seq(600, 7)]
    tree = PrefixTree.build(prompts)
    plan = group_prompts(tree, MIN_PREFIX)
    plan.check_integrity(tree)
    # The shared part stops one token short of `base`, which computes its last token itself;
    # the two longer prompts compute that token too (it is not worth a 1-token group).
    assert summary(plan) == [(None, 0, 19, [1, 0, 2], [], 3)]
    assert plan.num_computed_tokens == 19 + 1 + 6 + 8
    fine = group_prompts(tree, min_prefix_tokens=1)
    assert summary(fine) == [(None, 0, 19, [1], [1], 3), (0, 19, 20, [0, 2], [], 2)]
    assert fine.num_computed_tokens == tree.num_unique_tokens + 3 - 2


def test_no_sharing_and_single_prompt_are_plain():
    prompts = [seq(100 * i, 30) for i in range(1, 5)]
    for batch in (prompts, prompts[:1]):
        tree = PrefixTree.build(batch)
        plan = group_prompts(tree, MIN_PREFIX)
        plan.check_integrity(tree)
        assert plan.groups == [] and plan.prompt_group.tolist() == [-1] * len(batch)
        assert plan.num_computed_tokens == tree.num_logical_tokens == tree.num_unique_tokens
        assert plan.dfs_order() == list(range(len(batch))) and plan.groups_of(0) == []


def test_computed_tokens_on_random_batches():
    """Nested, finest grouping: every shared position once, plus each prompt's last token."""
    rng = random.Random(99)
    for _ in range(400):
        prompts = random_batch(rng)
        tree = PrefixTree.build(prompts)
        for min_prefix, min_share in ((1, 2), (2, 2), (1, 3), (3, 1)):
            plan = group_prompts(tree, min_prefix_tokens=min_prefix, min_share=min_share)
            plan.check_integrity(tree)
            assert plan.num_computed_tokens == recount(tree, plan)
            assert sorted(plan.dfs_order()) == list(range(len(prompts)))
        finest = group_prompts(tree, min_prefix_tokens=1, min_share=2)
        expected = tree.num_unique_tokens + len(prompts) - leaf_strings(prompts)
        assert finest.num_computed_tokens == expected, prompts


# -- flat (BatchLLM) groups -----------------------------------------------------------------------


def test_flat_groups_worked_example():
    """The docstring's example: long documents are hoisted out of the system prompt's group."""
    tree = PrefixTree.build(system_doc_question_batch())
    plan = group_prompts(tree, MIN_PREFIX, nested=False)
    plan.check_integrity(tree)
    assert summary(plan) == [(None, 0, 70, [0, 1, 2], [], 3), (None, 0, 80, [3, 4, 5], [], 3)]
    assert plan.num_computed_tokens == 70 + 80 + 2 * (5 + 6 + 7)
    # Short documents: one hoist alone loses (2 * 2 - 30 < 0) and forking both loses too, so
    # the system prompt's group keeps all six.
    short = [SYSTEM + seq(2000 + 100 * d, 2) + seq(5000 + 100 * (3 * d + q), 5) for d in range(2) for q in range(3)]
    tree = PrefixTree.build(short)
    plan = group_prompts(tree, MIN_PREFIX, nested=False)
    assert summary(plan) == [(None, 0, 30, [0, 1, 2, 3, 4, 5], [], 6)]


def test_flat_groups_see_past_a_short_shared_bos():
    bos = [1]
    prompts = [bos + doc + seq(5000 + 10 * q, 4) for doc in DOCS for q in range(3)]
    tree = PrefixTree.build(prompts)
    plan = group_prompts(tree, MIN_PREFIX, nested=False)
    assert summary(plan) == [(None, 0, 41, [0, 1, 2], [], 3), (None, 0, 51, [3, 4, 5], [], 3)]


def brute_flat_cost(prompts: list[list[int]], min_prefix: int, min_share: int) -> int:
    """Min cost over every labelling of the shareable trie's nodes as inside / group / forked."""
    cut = [tuple(p[:-1]) for p in prompts]
    nodes = {()} | set(cut)
    for a, b in itertools.combinations(cut, 2):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        nodes.add(a[:k])
    order = sorted(nodes, key=len)
    parent = {x: max((y for y in order if len(y) < len(x) and x[: len(y)] == y), key=len) for x in order[1:]}
    leaves = {x: sum(c[: len(x)] == x for c in cut) for x in order}
    best = None
    for labels in itertools.product("igf", repeat=len(order) - 1):
        label = {(): "f", **dict(zip(order[1:], labels))}
        if any(label[x] != "i" and label[parent[x]] == "i" for x in order[1:]):
            continue  # a node split from its group needs a split parent
        if any(label[x] == "g" and (leaves[x] < min_share or len(x) < min_prefix) for x in order):
            continue
        cost, used = len(prompts), set()
        for c in cut:
            home = max((x for x in order if label[x] != "i" and c[: len(x)] == x), key=len)
            covered = len(home) if label[home] == "g" else 0
            used.add(home if covered else None)
            cost += len(c) - covered
        cost += sum(len(x) for x in order if label[x] == "g" and x in used)
        best = cost if best is None else min(best, cost)
    return best


def test_flat_groups_are_optimal_on_small_random_batches():
    rng = random.Random(7)
    checked = 0
    while checked < 150:
        prompts = random_batch(rng)
        tree = PrefixTree.build(prompts)
        if tree.num_nodes > 8:
            continue
        for min_prefix, min_share in ((1, 2), (2, 2), (1, 3)):
            plan = group_prompts(tree, min_prefix_tokens=min_prefix, min_share=min_share, nested=False)
            plan.check_integrity(tree)
            assert plan.num_computed_tokens == brute_flat_cost(prompts, min_prefix, min_share), prompts
            assert all(g.parent is None and not g.children for g in plan.groups)
        checked += 1


# -- scale ---------------------------------------------------------------------------------------


def layered_batch(n_sys: int, n_doc: int, n_q: int, seed: int = 0) -> list[np.ndarray]:
    """System prompts x documents x questions, ~500 tokens each, as views of one numpy array."""
    rng = np.random.default_rng(seed)
    sys_len = rng.integers(80, 120, n_sys)
    doc_len = rng.integers(300, 400, (n_sys, n_doc))
    q_len = rng.integers(20, 60, (n_sys, n_doc, n_q))
    system = [rng.integers(0, 32000, n, dtype=np.int32) for n in sys_len]
    for s, tokens in enumerate(system):
        tokens[0] = s  # distinct leading tokens at every level, so the groups are exact
    prompts = []
    for s in range(n_sys):
        for d in range(n_doc):
            doc = rng.integers(0, 32000, doc_len[s, d], dtype=np.int32)
            doc[0] = d
            head = np.concatenate([system[s], doc])
            body = rng.integers(0, 32000, (n_q, q_len[s, d].max()), dtype=np.int32)
            body[:, 0] = np.arange(n_q)
            prompts.extend(np.concatenate([head, body[q, : q_len[s, d, q]]]) for q in range(n_q))
    return prompts


def check_layered(n_sys: int, n_doc: int, n_q: int) -> float:
    prompts = layered_batch(n_sys, n_doc, n_q)
    start = time.perf_counter()
    tree = PrefixTree.build(prompts)
    elapsed = time.perf_counter() - start
    plan = group_prompts(tree, MIN_PREFIX)
    grouped = time.perf_counter() - start - elapsed
    n = n_sys * n_doc * n_q
    print(f"\n{n} prompts, {tree.num_logical_tokens} tokens: build {elapsed:.2f} s, group {grouped:.2f} s")
    assert tree.num_prompts == n
    assert plan.share_histogram == {n_q: n_sys * n_doc, n_doc * n_q: n_sys}
    # distinct leaves, min_prefix satisfied by every level: the tree's optimum exactly
    assert plan.num_computed_tokens == tree.num_unique_tokens
    assert plan.num_grouped_prompts == n
    if n <= 20_000:
        tree.check_integrity()
    return elapsed


def test_build_10k_prompts():
    assert check_layered(10, 50, 20) < 20


@pytest.mark.slow
def test_build_100k_prompts_under_a_minute():
    assert check_layered(100, 50, 20) < 60
