"""Cost model: sharing predicts less time than no sharing, more work costs more, and the replay
takes exactly the steps the scheduler takes when a model runs."""

from __future__ import annotations

import dataclasses

import pytest

from treebatch.config import RunnerConfig, SchedulerConfig
from treebatch.core.calibration_table import CalibrationTable
from treebatch.core.cost_model import predict_batch_time, replay
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.outputs import StepResult
from treebatch.core.plan import plan_batch
from treebatch.core.request import Request
from treebatch.core.scheduler import Scheduler
from treebatch.sampling_params import SamplingParams

TABLE = CalibrationTable({16: 0.02, 64: 0.03, 256: 0.08, 1024: 0.3}, 2e-8, 256)
SYSTEM = list(range(1000, 1400))
SHARED = [SYSTEM + list(range(2000 + 50 * i, 2030 + 50 * i)) for i in range(24)]
DISTINCT = [list(range(10000 + 500 * i, 10000 + 500 * i + 60 + 7 * i)) for i in range(24)]
SCHEDULER = SchedulerConfig(max_num_batched_tokens=256)
RUNNER = RunnerConfig(shared_prefix_attention_min_decodes=1)


def predict(prompts, max_tokens, table=TABLE, scheduler=SCHEDULER, runner=RUNNER, num_kv_blocks=None, block_size=16):
    return predict_batch_time(prompts, max_tokens, table, scheduler, runner, block_size, num_kv_blocks)


def test_sharing_predicts_less_time_than_no_sharing():
    shared = predict(SHARED, 16)
    assert shared["predicted_seconds"] < 0.5 * shared["predicted_seconds_no_sharing"]
    assert shared["prefill_tokens"] == 400 + 24 * 30 and shared["prefill_tokens_no_sharing"] == 24 * 430
    distinct = predict(DISTINCT, 16)  # nothing to share: both the same
    assert distinct["predicted_seconds"] == distinct["predicted_seconds_no_sharing"]


def test_prediction_grows_with_tokens():
    seconds = [predict(SHARED, n)["predicted_seconds"] for n in (1, 4, 16, 64)]
    assert seconds == sorted(seconds) and seconds[0] < seconds[-1]
    longer = [p + list(range(30000, 30000 + extra)) for p, extra in zip(DISTINCT, [0] * 12 + [200] * 12)]
    assert predict(longer, 16)["predicted_seconds"] > predict(DISTINCT, 16)["predicted_seconds"]
    assert predict(DISTINCT * 2, 16)["predicted_seconds"] > predict(DISTINCT, 16)["predicted_seconds"]


def test_step_count_matches_the_schedule_by_hand():
    # One 100-token prompt, budget 256: one prefill step (samples token 1), then 9 decode steps,
    # the j-th reading the 100 + j keys before it.
    result = predict([list(range(100))], 10)
    assert result["num_steps"] == 10
    expected = TABLE.forward_time(100) + sum(TABLE.step_time(1, 100 + j, 1) for j in range(1, 10))
    assert result["predicted_seconds"] == pytest.approx(expected, abs=1e-4)


def test_kv_limit_and_dict_calibration():
    tight = predict(DISTINCT, 32, TABLE.to_dict(), num_kv_blocks=40)
    loose = predict(DISTINCT, 32, TABLE.to_dict())
    assert tight["predicted_seconds"] > loose["predicted_seconds"]
    assert tight["num_steps"] > loose["num_steps"]


def test_shared_prefix_attention_reads_the_prefix_once_per_group():
    table = CalibrationTable({16: 0.02, 64: 0.03, 256: 0.08, 1024: 0.3}, 1e-5, 256)
    once = predict(SHARED, 32, table)["predicted_seconds"]
    off = dataclasses.replace(RUNNER, enable_shared_prefix_attention=False)
    assert once < predict(SHARED, 32, table, runner=off)["predicted_seconds"]


def run_scheduler(plan, prompts, outputs, config, num_blocks, block_size):
    """The real scheduler with a runner that only counts: steps and prompt tokens computed."""
    scheduler = Scheduler(config, KVCacheManager(num_blocks, block_size), max_model_len=4096)
    requests = [
        Request(str(i), list(p), SamplingParams(max_tokens=n, ignore_eos=True), max_tokens=n)
        for i, (p, n) in enumerate(zip(prompts, outputs))
    ]
    scheduler.add_plan(plan, requests)
    steps = prefill = 0
    while scheduler.has_unfinished_requests:
        step = scheduler.schedule()
        assert not step.is_empty
        steps += 1
        prefill += sum(c.num_computed_prompt_tokens for c in step.chunks)
        scheduler.update(step, StepResult({c.request_id: 5 for c in step.chunks if c.needs_sample}))
        scheduler.check_integrity()
    assert all(r.num_output_tokens == n for r, n in zip(requests, outputs))
    return steps, prefill, scheduler.num_preemptions


@pytest.mark.parametrize("sharing", [True, False])
@pytest.mark.parametrize("num_blocks", [400, 40])  # plenty, and KV pressure (preemptions)
def test_replay_takes_the_scheduler_s_steps(sharing, num_blocks):
    prompts = [p[:60] for p in SHARED[:10]] + [p[:40] for p in DISTINCT[:6]]
    prompts = [SYSTEM[:20] + p for p in prompts]  # a short system prompt above everything
    outputs = [3 + 5 * (i % 4) for i in range(len(prompts))]
    config = SchedulerConfig(max_num_batched_tokens=48, enable_prefix_sharing=sharing, min_shared_prefix_tokens=4)
    plan = plan_batch(prompts, outputs, config, 4)
    steps, prefill, preemptions = run_scheduler(plan, prompts, outputs, config, num_blocks, 4)
    result = replay(plan, prompts, outputs, TABLE, config, RUNNER, 4, num_blocks, 4096)
    assert (result.num_steps, result.num_prefill_tokens, result.num_preemptions) == (steps, prefill, preemptions)
    assert result.num_decode_tokens == sum(outputs)
    if sharing and num_blocks == 400:
        assert prefill == plan.summary.num_planned_tokens  # enough KV: each prefix once
    if num_blocks == 40:
        assert preemptions > 0  # the pressure is real: recomputed work is replayed too
