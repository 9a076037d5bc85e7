"""Order policies: every policy yields a valid depth-first plan, and the same greedy tokens."""

from __future__ import annotations

import pytest

import dataclasses

import treebatch.core.plan as planning
from treebatch.config import SchedulerConfig
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.plan import plan_batch, rescaled_estimates, warmup_sample
from treebatch.core.policies import POLICIES, OrderNode, order_siblings
from treebatch.core.scheduler import Scheduler
from treebatch.core.request import Request
from treebatch.sampling_params import SamplingParams


def make_batch(ignore_eos: bool = True) -> list[Request]:
    """Two systems x two documents x questions, outputs differing per document, plus plain ones."""
    requests = []
    for s in range(2):
        system = list(range(1000 + 100 * s, 1020 + 100 * s))
        for d in range(2):
            document = list(range(2000 + 50 * (2 * s + d), 2012 + 50 * (2 * s + d)))
            for q in range(3):
                params = SamplingParams(max_tokens=4 + 20 * d + 7 * s, ignore_eos=ignore_eos)
                prompt = system + document + [3000 + 10 * q + s, 3001 + d]
                requests.append(Request(f"s{s}d{d}q{q}", prompt, params))
    for p in range(3):
        requests.append(Request(f"plain{p}", list(range(5000 + 40 * p, 5000 + 40 * p + 5 + 10 * p)),
                                SamplingParams(max_tokens=3 + 30 * p, ignore_eos=ignore_eos)))
    return requests


def plan(policy: str) -> tuple[list[Request], GroupManager]:
    config = SchedulerConfig(max_num_batched_tokens=64, min_shared_prefix_tokens=4, order_policy=policy)
    batch = make_batch()
    scheduler = Scheduler(config, KVCacheManager(64, 4), max_model_len=1024)
    queue = scheduler.add_plan(plan_batch([r.prompt_token_ids for r in batch], [r.max_tokens for r in batch], config, 4), batch)
    return queue, scheduler.groups


def use_policy(llm, policy: str) -> None:
    """Plan the engine's next batches with another order policy (the config is frozen)."""
    llm.engine.scheduler_config = dataclasses.replace(llm.engine.scheduler_config, order_policy=policy)


def group_chain(groups: GroupManager, group_id: int | None) -> list[int]:
    chain = []
    while group_id is not None:
        chain.append(group_id)
        group_id = groups.groups[group_id].parent
    return chain


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_orders_are_valid_depth_first_plans(policy):
    queue, groups = plan(policy)
    ids = [r.request_id for r in queue]
    members = [r for r in queue if not r.is_prefix]
    assert sorted(r.request_id for r in members) == sorted(r.request_id for r in make_batch())
    assert len(set(ids)) == len(ids)
    position = {r.request_id: i for i, r in enumerate(queue)}
    for request in queue:
        # every group a request starts from has its prefix request earlier in the queue
        for group_id in group_chain(groups, request.group_id):
            assert position[f"prefix-{group_id}"] < position[request.request_id]
    # depth-first: the requests under one group are contiguous, starting with its prefix
    for group_id in groups.groups:
        under = [i for i, r in enumerate(queue)
                 if group_id in group_chain(groups, r.prefix_of if r.is_prefix else r.group_id)]
        assert under == list(range(under[0], under[0] + len(under)))
        assert queue[under[0]].request_id == f"prefix-{group_id}"


def test_dfs_is_tree_order_and_fcfs_is_input_order():
    dfs = [r.request_id for r in plan("dfs")[0] if not r.is_prefix]
    assert dfs[-3:] == ["plain0", "plain1", "plain2"]  # plain requests last
    fcfs = [r.request_id for r in plan("fcfs")[0] if not r.is_prefix]
    assert fcfs == [r.request_id for r in make_batch()]


def test_ratio_puts_decode_heavy_siblings_first():
    nodes = [OrderNode(0, 100, 10), OrderNode(1, 10, 100), OrderNode(2, 50, 50)]
    assert order_siblings(nodes, "ratio") == [1, 2, 0]
    queue = [r.request_id for r in plan("ratio")[0] if not r.is_prefix]
    assert queue[0] == "plain2"  # 63 outputs for 25 prompt tokens: the most decode-heavy unit


def test_blend_alternates_compute_and_memory_heavy_ends():
    nodes = [OrderNode(0, 100, 1), OrderNode(1, 90, 2), OrderNode(2, 1, 100), OrderNode(3, 2, 90)]
    order = order_siblings(nodes, "blend")
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == 0 and order[1] == 2  # the densest prefill, then the longest decode
    assert {order[2], order[3]} == {1, 3}


def batch_plan(requests: list[Request]):
    config = SchedulerConfig(max_num_batched_tokens=64, min_shared_prefix_tokens=4)
    return plan_batch([r.prompt_token_ids for r in requests], [r.max_tokens for r in requests], config, 4)


def test_warmup_sample_scales_the_rest_by_measured_lengths(monkeypatch):
    monkeypatch.setattr(planning, "WARMUP_MIN_REQUESTS", 4)
    requests = make_batch(ignore_eos=False)  # 15 requests
    plan = batch_plan(requests)
    sample = warmup_sample(plan, "ratio", has_unknown_lengths=True, fraction=0.2)
    assert len(sample) == 3 and len(set(sample)) == 3
    measured = [max(1, requests[i].max_tokens // 4) for i in sample]  # each stopped at a quarter
    estimates = rescaled_estimates(
        plan, sample, measured, [r.max_tokens for r in requests], [False] * len(requests)
    )
    for i, request in enumerate(requests):
        assert 1 <= estimates[i] < request.max_tokens
    exact = rescaled_estimates(plan, sample, measured, [r.max_tokens for r in requests], [True] * len(requests))
    assert exact == [r.max_tokens for r in requests]  # ignore_eos: already exact


def test_warmup_only_for_length_weighing_policies_and_large_batches():
    small = batch_plan(make_batch(ignore_eos=False))
    assert warmup_sample(small, "ratio", True) == []  # tiny batch
    large = batch_plan(make_batch(ignore_eos=False) * 70)
    assert len(warmup_sample(large, "blend", True)) == round(planning.WARMUP_FRACTION * 15 * 70)
    assert warmup_sample(large, "dfs", True) == []
    assert warmup_sample(large, "ratio", False) == []  # exact already


def test_policies_keep_greedy_tokens(llm):
    from conftest import PROMPTS

    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    shared = ["You are a helpful assistant. Answer briefly. " + p for p in PROMPTS[:4]] + PROMPTS[4:7]
    reference = None
    try:
        for policy in POLICIES:
            use_policy(llm, policy)
            outputs = llm.generate(shared, params, use_tqdm=False)
            tokens = [o.outputs[0].token_ids for o in outputs]
            reference = reference or tokens
            assert tokens == reference, policy
    finally:
        use_policy(llm, llm.config.scheduler.order_policy)


def test_engine_runs_the_warmup_sample_first_then_the_rest(llm, monkeypatch):
    from conftest import PROMPTS

    params = SamplingParams(temperature=0.0, max_tokens=3)  # EOS may stop: lengths unknown
    use_policy(llm, "dfs")
    reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:8], params, use_tqdm=False)]
    monkeypatch.setattr(planning, "WARMUP_MIN_REQUESTS", 4)
    monkeypatch.setattr(planning, "WARMUP_FRACTION", 0.2)
    started = []
    original = llm.engine._add_plan
    monkeypatch.setattr(llm.engine, "_add_plan", lambda plan, requests: (started.append(len(requests)), original(plan, requests)))
    try:
        use_policy(llm, "ratio")
        outputs = llm.generate(PROMPTS[:8], params, use_tqdm=False)
    finally:
        use_policy(llm, llm.config.scheduler.order_policy)
    assert started == [2, 6]  # the sample alone, then the rest once it finished
    assert [o.outputs[0].token_ids for o in outputs] == reference
