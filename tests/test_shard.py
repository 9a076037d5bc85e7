"""Prefix-aware sharding (core/shard.py): whole top-level groups per replica, balanced by load;
a unit bigger than a fair share is split one level down; round-robin for comparison."""

from __future__ import annotations

from treebatch.config import SchedulerConfig
from treebatch.core.plan import plan_batch
from treebatch.core.shard import round_robin, shard_plan, shard_units

CONFIG = SchedulerConfig(max_num_batched_tokens=64, min_shared_prefix_tokens=8)


def _ids():
    tokens = iter(range(1000, 10**6))
    return lambda n: [next(tokens) for _ in range(n)]


def _plan(prompts, outputs):
    return plan_batch(prompts, outputs, CONFIG, 16)


def test_every_sequence_lands_once_and_no_prefix_is_split():
    ids = _ids()
    docs = [ids(50 + 10 * d) for d in range(5)]
    prompts = [doc + ids(4) for doc in docs for _ in range(3)] + [ids(30) for _ in range(4)]
    outputs = [8] * len(prompts)
    plan = _plan(prompts, outputs)
    assert len(shard_units(plan)) == 5 + 4
    shards = shard_plan(plan, [len(p) for p in prompts], outputs, 3)
    assert sorted(s for shard in shards for s in shard) == list(range(len(prompts)))
    for d in range(5):  # a document's three questions share one replica
        assert sum(any(3 * d + q in shard for q in range(3)) for shard in shards) == 1
    loads = [sum(len(prompts[s]) for s in shard) for shard in shards]
    assert max(loads) < 1.6 * min(loads)


def test_a_unit_bigger_than_a_share_is_split_one_level_down():
    ids = _ids()
    system = ids(40)
    docs = [ids(60) for _ in range(4)]
    prompts = [system + doc + ids(5) for doc in docs for _ in range(4)]
    outputs = [8] * 16
    plan = _plan(prompts, outputs)
    assert len(shard_units(plan)) == 1  # one system prompt over everything
    shards = shard_plan(plan, [len(p) for p in prompts], outputs, 2)
    assert [len(shard) for shard in shards] == [8, 8]
    for d in range(4):  # a document group still stays whole
        assert sum(any(4 * d + q in shard for q in range(4)) for shard in shards) == 1
    assert shard_plan(plan, [len(p) for p in prompts], outputs, 1) == [list(range(16))]


def test_fewer_units_than_replicas_leave_replicas_idle():
    ids = _ids()
    plan = _plan([ids(30)], [8])
    assert shard_plan(plan, [30], [8], 3) == [[0], [], []]


def test_round_robin_ignores_prefixes():
    assert round_robin(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
