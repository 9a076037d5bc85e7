"""Order policies: every policy yields a valid depth-first plan, and the same greedy tokens."""

from __future__ import annotations

import pytest

from treebatch.core.batch_plan import plan_requests
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.policies import POLICIES, OrderNode, WarmupSample, order_siblings
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
    groups = GroupManager(KVCacheManager(64, 4))
    queue, _ = plan_requests(make_batch(), groups, block_size=4, min_prefix_tokens=4, order_policy=policy)
    return queue, groups


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


def test_warmup_sample_scales_the_rest_by_measured_lengths():
    requests = make_batch(ignore_eos=False) * 1  # 15 requests
    warmup = WarmupSample(requests, min_prefix_tokens=4, fraction=0.2)
    assert len(warmup.sample) == 3 and len(warmup.sample) + len(warmup.rest) == len(requests)
    for request in warmup.sample:  # each stopped after a quarter of its max_tokens
        request.output_token_ids = [7] * max(1, request.max_tokens // 4)
    warmup.apply()
    for request in warmup.rest:
        assert request.estimated_output_tokens < request.max_tokens
        assert request.estimated_output_tokens >= 1


def test_warmup_only_for_length_weighing_policies_and_large_batches():
    small = make_batch(ignore_eos=False)
    assert not WarmupSample.is_worth_it("ratio", small)  # tiny batch
    large = small * 70
    assert WarmupSample.is_worth_it("blend", large)
    assert not WarmupSample.is_worth_it("dfs", large)
    assert not WarmupSample.is_worth_it("ratio", make_batch(ignore_eos=True) * 70)  # exact already


def test_policies_keep_greedy_tokens(llm):
    from conftest import PROMPTS

    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    shared = ["You are a helpful assistant. Answer briefly. " + p for p in PROMPTS[:4]] + PROMPTS[4:7]
    reference = None
    try:
        for policy in POLICIES:
            llm.engine.order_policy = policy
            outputs = llm.generate(shared, params, use_tqdm=False)
            tokens = [o.outputs[0].token_ids for o in outputs]
            reference = reference or tokens
            assert tokens == reference, policy
    finally:
        llm.engine.order_policy = llm.config.scheduler.order_policy


def test_engine_runs_the_warmup_sample_first_then_the_rest(llm, monkeypatch):
    from conftest import PROMPTS

    import treebatch.core.policies as policies

    params = SamplingParams(temperature=0.0, max_tokens=3)  # EOS may stop: lengths unknown
    llm.engine.order_policy = "dfs"
    reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:8], params, use_tqdm=False)]
    monkeypatch.setattr(policies, "WARMUP_MIN_REQUESTS", 4)
    monkeypatch.setattr(policies, "WARMUP_FRACTION", 0.2)
    started = []
    original = llm.engine._plan_and_add
    monkeypatch.setattr(llm.engine, "_plan_and_add", lambda requests: (started.append(len(requests)), original(requests)))
    try:
        llm.engine.order_policy = "ratio"
        outputs = llm.generate(PROMPTS[:8], params, use_tqdm=False)
    finally:
        llm.engine.order_policy = llm.config.scheduler.order_policy
    assert started == [2, 6]  # the sample alone, then the rest once it finished
    assert [o.outputs[0].token_ids for o in outputs] == reference
