"""Block pool, KV manager and scheduler with tiny fake configs and exact block ids."""

import subprocess
import sys

import pytest

from treebatch.config import SchedulerConfig
from treebatch.core.block_pool import BlockPool
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.outputs import StepResult
from treebatch.core.plan import plan_batch
from treebatch.core.request import Request, RequestStatus
from treebatch.core.scheduler import Scheduler
from treebatch.sampling_params import SamplingParams


def make_request(rid: str, num_prompt: int, max_tokens: int = 4, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, list(range(100, 100 + num_prompt)), sp, eos_token_ids=(0,))


def make_scheduler(num_blocks=8, block_size=4, budget=16, max_seqs=8, max_model_len=64, window=None):
    kv = KVCacheManager(num_blocks, block_size, window)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, kv, max_model_len)


def run_step(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    sampled = {c.request_id: token for c in plan.chunks if c.needs_sample}
    finished = scheduler.update(plan, StepResult(sampled))
    scheduler.check_integrity()
    return plan, finished


def test_core_does_not_import_torch():
    code = "import sys, treebatch.core.scheduler, treebatch.core; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_block_pool_hands_out_the_lowest_free_ids_first():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.release([1, 0])
    assert pool.allocate(1) == [0]  # freed blocks are reused before the untouched block 3
    assert pool.allocate(2) == [1, 3]
    pool.add_reference([2])
    pool.release([2])
    assert pool.ref_count(2) == 1 and pool.num_free_blocks == 0
    pool.release([0])
    pool.check_integrity({1: 1, 2: 1, 3: 1})
    with pytest.raises(RuntimeError):
        pool.allocate(2)


def test_block_pool_integrity_catches_double_release():
    pool = BlockPool(2)
    pool.allocate(1)
    pool.release([0])
    with pytest.raises(AssertionError):
        pool.release([0])


def test_kv_manager_grows_tables_and_refuses_without_change():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = make_request("a", 5), make_request("b", 4)
    assert kv.allocate_slots(a, 5) and kv.block_tables["a"] == [0, 1]
    a.num_computed_tokens = 5
    assert kv.allocate_slots(a, 3) and kv.block_tables["a"] == [0, 1]  # slots 5..7 in block 1
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free
    assert "b" not in kv.block_tables and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 3
    assert kv.allocate_slots(b, 8) and kv.block_tables["b"] == [0, 1]  # the lowest free ids
    kv.check_integrity()


def test_prefill_then_decode_exact_blocks():
    s = make_scheduler(num_blocks=8, block_size=4, budget=16)
    s.add_request(make_request("a", 6, max_tokens=3))
    s.add_request(make_request("b", 5, max_tokens=3))
    plan, _ = run_step(s)
    assert [(c.request_id, c.start_position, c.num_tokens) for c in plan.chunks] == [("a", 0, 6), ("b", 0, 5)]
    assert plan.chunks[0].block_table == [0, 1] and plan.chunks[1].block_table == [2, 3]
    assert [n.request_id for n in plan.new_requests] == ["a", "b"]
    plan, _ = run_step(s)
    assert [(c.request_id, c.start_position, c.num_tokens) for c in plan.chunks] == [("a", 6, 1), ("b", 5, 1)]
    assert all(c.is_decode for c in plan.chunks) and plan.new_requests == []
    plan, finished = run_step(s)
    assert [r.request_id for r in finished] == ["a", "b"]
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in finished)
    assert s.kv.num_free_blocks == 8 and not s.has_unfinished_requests
    plan = s.schedule()
    assert plan.is_empty and plan.finished_request_ids == ["a", "b"]


def test_chunked_prefill_under_budget():
    s = make_scheduler(num_blocks=16, block_size=4, budget=8)
    s.add_request(make_request("a", 20, max_tokens=2))
    s.add_request(make_request("b", 3, max_tokens=2))
    plans = [run_step(s)[0] for _ in range(4)]
    layout = [[(c.request_id, c.start_position, c.num_tokens, c.needs_sample) for c in p.chunks] for p in plans]
    assert layout[0] == [("a", 0, 8, False)]
    assert layout[1] == [("a", 8, 8, False)]
    assert layout[2] == [("a", 16, 4, True), ("b", 0, 3, True)]  # b fills the rest of the budget
    assert layout[3] == [("a", 20, 1, True), ("b", 3, 1, True)]
    assert all(p.num_tokens <= 8 for p in plans)


def test_max_num_seqs_limits_running():
    s = make_scheduler(num_blocks=16, budget=64, max_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, 2, max_tokens=2))
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["c"]


def test_preemption_recomputes_and_keeps_outputs():
    # 4 blocks of 2 slots; two requests of 3 prompt tokens each need 2 blocks, then a 3rd on decode.
    s = make_scheduler(num_blocks=4, block_size=2, budget=16)
    a, b = make_request("a", 3, max_tokens=4), make_request("b", 3, max_tokens=4)
    a.estimated_output_tokens = b.estimated_output_tokens = 1  # expected to stop early: both admitted
    s.add_request(a)
    s.add_request(b)
    plan, _ = run_step(s, token=11)  # prefill both: a [0,1], b [2,3]
    assert s.kv.block_tables == {"a": [0, 1], "b": [2, 3]}
    plan, _ = run_step(s, token=12)  # decode at position 3 fits in the 2nd blocks
    plan, _ = run_step(s, token=13)  # position 4 needs a new block for a: b is preempted
    assert plan.preempted_request_ids == ["b"]
    assert [c.request_id for c in plan.chunks] == ["a"] and s.kv.block_tables["a"] == [0, 1, 2]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [11, 12]
    while s.has_unfinished_requests:
        plan, _ = run_step(s, token=14)
        for c in plan.chunks:
            if c.request_id == "b" and c.start_position == 0:
                # recompute covers prompt and kept outputs in one chunk
                assert c.token_ids == [100, 101, 102, 11, 12]
    assert a.output_token_ids == [11, 12, 13, 14] and b.output_token_ids == [11, 12, 14, 14]
    assert s.num_preemptions >= 1 and s.kv.num_free_blocks == 4


def test_request_too_large_for_cache_is_refused_clearly():
    s = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="more than the whole cache"):
        s.add_request(make_request("big", 6, max_tokens=8))
    with pytest.raises(ValueError, match="context"):
        s.add_request(make_request("long", 64))


def test_eos_stop_token_and_min_tokens():
    s = make_scheduler()
    a = make_request("a", 2, max_tokens=8, min_tokens=2)
    b = make_request("b", 2, max_tokens=8, stop_token_ids=[9])
    s.add_request(a)
    s.add_request(b)
    plan = s.schedule()
    s.update(plan, StepResult({"a": 0, "b": 9}))  # a: EOS before min_tokens is kept going
    assert a.status == RequestStatus.RUNNING
    assert b.status == RequestStatus.FINISHED_STOPPED and b.stop_reason == 9
    plan = s.schedule()
    s.update(plan, StepResult({"a": 0}))
    assert a.status == RequestStatus.FINISHED_STOPPED and a.output_token_ids == [0, 0]
    s.check_integrity()


def test_ignore_eos_runs_to_max_tokens():
    s = make_scheduler()
    a = make_request("a", 2, max_tokens=3, ignore_eos=True)
    s.add_request(a)
    while s.has_unfinished_requests:
        run_step(s, token=0)
    assert a.output_token_ids == [0, 0, 0] and a.status == RequestStatus.FINISHED_LENGTH


# -- prefix groups -------------------------------------------------------------------------------


def plan_into(s: Scheduler, requests: list[Request], min_prefix_tokens: int = 4):
    config = SchedulerConfig(max_num_batched_tokens=16, min_shared_prefix_tokens=min_prefix_tokens, order_policy="dfs")
    plan = plan_batch([r.prompt_token_ids for r in requests], [r.max_tokens for r in requests], config, s.kv.block_size)
    return s.add_plan(plan, requests), plan.summary


def test_group_prefix_computed_once_shared_and_freed_exact_blocks():
    s = make_scheduler(num_blocks=8, block_size=4, budget=16)
    prefix = [5, 6, 7, 8, 9, 10]
    a = Request("a", prefix + [1, 2], SamplingParams(max_tokens=2), eos_token_ids=(0,))
    b = Request("b", prefix + [3, 4], SamplingParams(max_tokens=2), eos_token_ids=(0,))
    queue, summary = plan_into(s, [a, b])
    assert [r.request_id for r in queue] == ["prefix-0", "a", "b"]
    assert summary.num_groups == 1 and summary.num_planned_tokens == summary.num_unique_tokens == 10

    plan, _ = run_step(s)  # the prefix alone: members wait for it
    assert [(c.request_id, c.start_position, c.num_tokens, c.needs_sample) for c in plan.chunks] == [
        ("prefix-0", 0, 6, False)
    ]
    assert s.groups.groups[0].blocks == [0, 1] and s.groups.groups[0].is_ready
    assert plan.new_requests == []  # prefix requests never reach the sampler

    plan, _ = run_step(s)  # both members share block 0 and copy the partial block 1
    assert [(c.request_id, c.start_position, c.num_tokens) for c in plan.chunks] == [("a", 6, 2), ("b", 6, 2)]
    assert plan.block_copies == [(1, 2, 2), (1, 3, 2)]
    assert s.kv.block_tables == {"a": [0, 2], "b": [0, 3]}
    assert [s.kv.pool.ref_count(i) for i in range(4)] == [3, 1, 1, 1]
    assert a.num_cached_tokens == 6 and all(c.num_shared_tokens == 4 and c.group_id == 0 for c in plan.chunks)

    run_step(s)  # second output token: both finish, the group's blocks go back to the pool
    assert a.is_finished and b.is_finished
    assert s.groups.groups[0].is_released and s.kv.num_free_blocks == 8


def test_nested_groups_extend_parent_kv_and_release_bottom_up():
    s = make_scheduler(num_blocks=32, block_size=4, budget=64)
    system = list(range(10, 18))  # 8 tokens: two full blocks
    docs = [list(range(20, 28)), list(range(30, 38))]
    requests = [
        Request(f"d{d}q{q}", system + docs[d] + [40 + q, 50 + q], SamplingParams(max_tokens=1), eos_token_ids=(0,))
        for d in range(2)
        for q in range(2)
    ]
    queue, summary = plan_into(s, requests)
    assert summary.num_planned_tokens == summary.num_unique_tokens == 8 + 2 * 8 + 4 * 2
    prompt_lengths = {r.request_id: r.num_prompt_tokens for r in queue}
    computed = 0
    while s.has_unfinished_requests:
        plan, _ = run_step(s)
        for c in plan.chunks:  # prompt tokens run through the model this step
            computed += max(0, min(c.start_position + c.num_tokens, prompt_lengths[c.request_id]) - c.start_position)
    assert computed == summary.num_planned_tokens
    assert all(g.is_released for g in s.groups.groups.values()) and s.kv.num_free_blocks == 32


def test_admission_is_bound_by_kv_growth_not_request_count():
    # 8 blocks of 4; six 4-token prompts that will grow to 8 tokens (a second block each).
    # The k-th admission must leave half the running requests' growth free: 7 - k >= (k + 1) / 2.
    s = make_scheduler(num_blocks=8, block_size=4, budget=64, max_seqs=1024)
    for rid in "abcdef":
        s.add_request(make_request(rid, 4, max_tokens=4, ignore_eos=True))
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b", "c", "d", "e"]
    while s.has_unfinished_requests:
        run_step(s)
    assert s.kv.num_free_blocks == 8


def test_decodes_come_before_running_prefill_chunks():
    # `b` (a long prompt) was admitted first and is mid-prefill; `a`, admitted after it, decodes.
    # Admission order would put b's chunk first and starve a; stall-free order runs a's decode
    # first in every step and gives b the rest of the budget.
    s = make_scheduler(num_blocks=64, block_size=4, budget=8)
    b = make_request("b", 30, max_tokens=2)
    s.add_request(b)
    run_step(s)  # b's first chunk
    a = make_request("a", 2, max_tokens=6)
    s.requests["a"] = a
    assert s.kv.allocate_slots(a, 2)
    a.num_computed_tokens = 2
    a.append_output_token(7)
    a.status = RequestStatus.RUNNING
    s.running.append(a)
    assert [r.request_id for r in s.running] == ["b", "a"]
    for _ in range(3):
        plan, _ = run_step(s)
        assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 7)]


# ---------------------------------------------------------------- sliding windows


def test_blocks_leave_the_window_as_a_long_generation_goes_on():
    # Window 8, blocks of 4: a query at p reads keys p-7..p, so a decode keeps at most 3 blocks
    # live and a chunk of 4 at most 4. The request's 10 + 40 tokens need 13 blocks whole; a pool
    # of 4 holds it without preempting.
    s = make_scheduler(num_blocks=4, block_size=4, budget=4, max_model_len=64, window=8)
    r = make_request("a", 10, max_tokens=40, ignore_eos=True)
    s.add_request(r)
    null = s.kv.null_block
    assert null == 4
    while r.num_computed_tokens < 11:  # the prompt in chunks, then the first decode at 10
        run_step(s)
    assert s.kv.block_tables["a"] == [0, 1, 2]
    run_step(s)  # the query at 11 reads keys 4..11: block 0 (0..3) is dead
    assert s.kv.block_tables["a"] == [null, 1, 2] and s.kv.num_live_blocks(r) == 2
    while s.has_unfinished_requests:
        plan, _ = run_step(s)
        assert not plan.preempted_request_ids
        if s.has_unfinished_requests:
            assert s.kv.num_live_blocks(r) <= s.kv.peak_blocks(50) == 3
    assert r.num_output_tokens == 40 and s.kv.num_free_blocks == 4
    assert s.kv.pool.peak_used_blocks == 3 == s.kv.peak_blocks(50, chunk=4) - 1


def test_a_window_lets_a_request_longer_than_the_cache_in():
    whole = make_scheduler(num_blocks=4, block_size=4, budget=8, max_model_len=64)
    with pytest.raises(ValueError, match="more than the whole cache"):
        whole.add_request(make_request("a", 30, max_tokens=20))
    # Chunks of 8 under window 8: the 7 keys before a chunk and the chunk span at most 5 blocks.
    assert KVCacheManager(4, 4, window=8).peak_blocks(50, chunk=8) == 5
    windowed = make_scheduler(num_blocks=5, block_size=4, budget=8, max_model_len=64, window=8)
    r = make_request("a", 30, max_tokens=20, ignore_eos=True)
    windowed.add_request(r)
    while windowed.has_unfinished_requests:
        run_step(windowed)
    assert r.num_output_tokens == 20 and windowed.kv.num_free_blocks == 5


def test_a_group_keeps_only_its_prefix_window_and_members_keep_its_entries():
    s = make_scheduler(num_blocks=12, block_size=4, budget=32, window=8)
    prefix = list(range(40, 60))  # 20 tokens: 5 blocks, of which keys 13..19 stay in the window
    a = Request("a", prefix + [1, 2], SamplingParams(max_tokens=3), eos_token_ids=(0,))
    b = Request("b", prefix + [3, 4, 5], SamplingParams(max_tokens=3), eos_token_ids=(0,))
    plan_into(s, [a, b])
    run_step(s)  # the prefix, then its blocks before position 13 (blocks 0..2) are freed
    null = s.kv.null_block
    group = s.groups.groups[0]
    assert group.blocks == [null, null, null, 3, 4] and s.kv.num_free_blocks == 10
    run_step(s)  # the members begin with the group's entries, nulls included
    assert s.kv.block_tables["a"][:5] == s.kv.block_tables["b"][:5] == [null, null, null, 3, 4]
    while s.has_unfinished_requests:
        run_step(s)  # the members never free the group's blocks; the group does, once
    assert s.kv.num_free_blocks == 12 and not s.groups.held_blocks()

