"""Property tests of the core: random batches through the real scheduler and a fake runner.

Batches are built from shared prefixes of random depth (a system prompt, documents under it,
questions under those), with n > 1 samples, random output lengths and tiny KV pools. After every
step the block pool's integrity holds; every sequence finishes exactly once with its length; when
the KV pool holds the whole batch, the prompt tokens computed equal the plan's; an abort at a
random step releases every block.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from treebatch.config import SchedulerConfig
from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.outputs import StepResult
from treebatch.core.plan import plan_batch
from treebatch.core.request import Request, RequestStatus
from treebatch.core.scheduler import Scheduler
from treebatch.sampling_params import SamplingParams

BLOCK = 4
BUDGET = 24
SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw):
    """(prompts, max_tokens per sequence, samples per prompt): a random prefix forest."""
    tokens = iter(range(1000, 10**6))
    prompts: list[list[int]] = []

    def grow(prefix: list[int], depth: int) -> None:
        for _ in range(draw(st.integers(1 if depth else 2, 4))):
            part = [next(tokens) for _ in range(draw(st.integers(1, 9)))]
            if depth < 3 and draw(st.integers(0, 2)) > 0:
                grow(prefix + part, depth + 1)
            else:
                prompts.append(prefix + part)
                if draw(st.integers(0, 4)) == 0:
                    prompts.append(list(prompts[-1]))  # a duplicate prompt

    grow([], 0)
    prompts = prompts[:14]
    samples = [draw(st.integers(1, 3)) for _ in prompts]
    outputs = [draw(st.integers(1, 12)) for _ in prompts]
    return prompts, outputs, samples


def build(prompts, outputs, samples, policy, sharing):
    sequences = []
    for p, (prompt, max_tokens, n) in enumerate(zip(prompts, outputs, samples)):
        for k in range(n):
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            sequences.append(Request(f"{p}#{k}", list(prompt), params, max_tokens=max_tokens))
    config = SchedulerConfig(
        max_num_batched_tokens=BUDGET, min_shared_prefix_tokens=2, order_policy=policy, enable_prefix_sharing=sharing
    )
    plan = plan_batch([s.prompt_token_ids for s in sequences], [s.max_tokens for s in sequences], config, BLOCK)
    return sequences, config, plan


def smallest_sound_pool(plan, sequences, window: int | None = None) -> int:
    """The smallest pool the scheduler promises to finish in: the longest sequence, a block for
    each level of nesting (a copy of a partial prefix block each) and one more. Tiny pools force
    preemptions, and group prefixes pinned elsewhere are given back when nothing else can run.
    Under a sliding window a sequence holds at most a window's worth of blocks (chunks of the
    budget included) and each enclosing group as much, when that is less than its length."""
    depth = plan.summary.max_depth
    longest = max(num_blocks_for(s.max_num_tokens, BLOCK) for s in sequences)
    if window is not None:
        longest = min(longest, KVCacheManager(1, BLOCK, window).peak_blocks(10**6, BUDGET) * (depth + 1))
    return longest + depth + 1


def step(scheduler: Scheduler, finished: list[str]) -> int:
    """One step with a runner that samples token 3; returns prompt tokens computed."""
    plan = scheduler.schedule()
    assert not plan.is_empty, "nothing scheduled while requests wait"
    done = scheduler.update(plan, StepResult({c.request_id: 3 for c in plan.chunks if c.needs_sample}))
    finished.extend(r.request_id for r in done)
    scheduler.check_integrity()
    return sum(c.num_computed_prompt_tokens for c in plan.chunks)


@SETTINGS
@given(
    batches(), st.sampled_from(["fcfs", "dfs", "ratio", "blend"]), st.booleans(), st.integers(0, 16),
    st.sampled_from([None, None, 3, 6, 13]),
)
def test_every_sequence_finishes_once_and_kv_comes_back(batch, policy, sharing, spare_blocks, window):
    prompts, outputs, samples = batch
    sequences, config, plan = build(prompts, outputs, samples, policy, sharing)
    num_blocks = smallest_sound_pool(plan, sequences, window) + spare_blocks
    scheduler = Scheduler(config, KVCacheManager(num_blocks, BLOCK, window), max_model_len=4096)
    scheduler.add_plan(plan, sequences)
    finished: list[str] = []
    computed = 0
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests:
            break
        computed += step(scheduler, finished)
    assert not scheduler.has_unfinished_requests
    assert sorted(finished) == sorted(s.request_id for s in sequences)  # each exactly once
    assert all(s.num_output_tokens == s.max_tokens and s.status == RequestStatus.FINISHED_LENGTH for s in sequences)
    assert scheduler.kv.num_free_blocks == num_blocks and not scheduler.groups.held_blocks()
    recomputed = scheduler.num_preemptions + scheduler.num_unpinned_prefixes
    event("recomputed" if recomputed else "nothing recomputed")
    event(f"{plan.summary.num_groups > 0 and 'with' or 'without'} groups")
    event("windowed" if window else "full attention")
    if not recomputed:  # the plan's count exactly
        assert computed == plan.summary.num_planned_tokens
    else:
        assert computed >= plan.summary.num_planned_tokens


@SETTINGS
@given(batches(), st.booleans(), st.integers(0, 30), st.data())
def test_abort_at_any_step_releases_every_block(batch, sharing, abort_after, data):
    prompts, outputs, samples = batch
    sequences, config, plan = build(prompts, outputs, samples, "ratio", sharing)
    num_blocks = smallest_sound_pool(plan, sequences) + 4
    scheduler = Scheduler(config, KVCacheManager(num_blocks, BLOCK), max_model_len=4096)
    scheduler.add_plan(plan, sequences)
    finished: list[str] = []
    for _ in range(abort_after):
        if not scheduler.has_unfinished_requests:
            break
        step(scheduler, finished)
    unfinished = [s.request_id for s in sequences if not s.is_finished]
    dropped = data.draw(st.lists(st.sampled_from(unfinished), unique=True) if unfinished else st.just([]))
    scheduler.abort(dropped)
    scheduler.check_integrity()
    while scheduler.has_unfinished_requests:  # the rest still runs to the end
        step(scheduler, finished)
    assert sorted(finished + dropped) == sorted(s.request_id for s in sequences)
    assert all(s.status == RequestStatus.FINISHED_ABORTED for s in sequences if s.request_id in dropped)
    assert scheduler.kv.num_free_blocks == num_blocks and not scheduler.groups.held_blocks()
    assert not scheduler.requests
