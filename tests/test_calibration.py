"""Start-up calibration: the budget is the knee of the measured curve, cached and reused."""

from __future__ import annotations

import json

import torch

from treebatch.core.calibration_table import CalibrationTable, choose_token_budget
from treebatch.core.outputs import StepPlan
from treebatch.runtime.calibration import cache_path, load_or_measure, measure, scratch_blocks


class FakeRunner:
    """Charges a fake clock per step: a fixed cost up to 64 tokens, then 5000 tokens/s (the knee
    is 128), plus 1 us per decode context key, 0.1 us per (chunk query, earlier key) pair and
    1 ms per prefill chunk beyond the first."""

    block_size = 16

    def __init__(self, clock: list[float]) -> None:
        self.kv_cache = torch.ones(1, 2, 64 * 16, 1, 2)
        self.clock = clock
        self.num_steps = 0

    def execute(self, plan: StepPlan) -> None:
        self.num_steps += 1
        self.clock[0] += max(0.02, plan.num_tokens / 5000)
        self.clock[0] += sum(c.start_position for c in plan.chunks if c.num_tokens == 1) * 1e-6
        self.clock[0] += sum(c.num_tokens * c.start_position for c in plan.chunks if c.num_tokens > 1) * 1e-7
        self.clock[0] += max(0, sum(1 for c in plan.chunks if c.num_tokens > 1) - 1) * 1e-3


def fake():
    clock = [0.0]
    return FakeRunner(clock), lambda: clock[0]


def steady(seconds: float = 1.0):
    """The machine's pace, now and around a measurement, as a fixed number."""
    return (lambda: seconds, lambda: seconds)


def test_measure_finds_the_knee_and_the_attention_cost():
    runner, timer = fake()
    table = measure(runner, {"model": "m"}, timer)
    assert table.token_budget == 256 and table.is_complete  # knee 128, floor 256
    assert max(table.forward_seconds) == 512  # stopped once two sizes gained nothing, past 2 * floor
    assert abs(table.seconds_per_context_pair - 1e-6) < 1e-9
    assert abs(table.seconds_per_chunk_pair - 1e-7) < 1e-10
    assert abs(table.seconds_per_chunk - 1e-3) < 1e-9
    assert runner.kv_cache.abs().sum() == 0  # scratch KV zeroed again


def test_decodes_are_timed_over_blocks_of_their_own():
    runner, timer = fake()
    tables = []
    execute = runner.execute
    runner.execute = lambda plan: (tables.append([c.block_table for c in plan.chunks if c.num_tokens == 1]), execute(plan))
    measure(runner, {"model": "m"}, timer)
    decode_steps = [t for t in tables if len(t) > 1]
    assert decode_steps and all(len({tuple(b) for b in step}) == len(step) for step in decode_steps)


def test_calibration_is_cached_and_reused_per_key(tmp_path):
    runner, timer = fake()
    first = load_or_measure(runner, {"model": "m", "threads": 2}, tmp_path, timer, steady())
    steps = runner.num_steps
    assert steps > 0 and cache_path({"model": "m", "threads": 2}, tmp_path).is_file()
    again = load_or_measure(runner, {"model": "m", "threads": 2}, tmp_path, timer, steady())
    assert runner.num_steps == steps and again == first and first.pace == 1.0  # read back, nothing run
    load_or_measure(runner, {"model": "m", "threads": 1}, tmp_path, timer, steady())
    assert runner.num_steps > steps  # another key measures again
    data = json.loads(cache_path({"model": "m", "threads": 2}, tmp_path).read_text())
    assert CalibrationTable.from_dict(data) == first


def test_a_table_measured_under_load_is_measured_again(tmp_path):
    runner, timer = fake()
    paces = iter([2.0, 2.4])  # the machine's pace before and after: busy throughout
    loaded = load_or_measure(runner, {"model": "m"}, tmp_path, timer, (lambda: 1.0, lambda: next(paces)))
    assert loaded.pace == 2.4  # the slower of the two
    steps = runner.num_steps
    # A start on a machine as busy (pace 2.0: within LOADED_FACTOR of 2.4) reads it back...
    assert load_or_measure(runner, {"model": "m"}, tmp_path, timer, steady(2.0)) == loaded
    assert runner.num_steps == steps
    # ...one on a quiet machine measures again and keeps the new table.
    quiet = load_or_measure(runner, {"model": "m"}, tmp_path, timer, steady(1.0))
    assert runner.num_steps > steps and quiet.pace == 1.0
    data = json.loads(cache_path({"model": "m"}, tmp_path).read_text())
    assert CalibrationTable.from_dict(data) == quiet


def test_a_table_stored_without_its_pace_is_measured_again(tmp_path):
    runner, timer = fake()
    table = load_or_measure(runner, {"model": "m"}, tmp_path, timer, steady())
    data = table.to_dict()
    del data["pace"]  # as written before the pace was kept
    cache_path({"model": "m"}, tmp_path).write_text(json.dumps(data))
    steps = runner.num_steps
    load_or_measure(runner, {"model": "m"}, tmp_path, timer, steady())
    assert runner.num_steps > steps


def test_cut_short_measurement_falls_back_and_is_not_cached(tmp_path):
    clock = [0.0]
    runner = FakeRunner(clock)
    runner.execute = lambda plan: clock.__setitem__(0, clock[0] + 3.0)  # a very busy machine
    table = load_or_measure(runner, {"model": "slow"}, tmp_path, lambda: clock[0], steady())
    assert not table.is_complete and table.token_budget == 512
    assert not cache_path({"model": "slow"}, tmp_path).exists()


def test_choose_token_budget_is_the_smallest_size_near_the_best_rate():
    curve = {32: 0.032, 64: 0.040, 128: 0.060, 256: 0.115, 512: 0.23}
    assert choose_token_budget(curve, floor=0) == 128
    assert choose_token_budget({32: 0.01, 64: 0.04}, floor=0) == 32


def test_token_budget_has_a_floor_capped_by_the_curve():
    curve = {32: 0.032, 64: 0.040, 128: 0.060, 256: 0.115, 512: 0.23}
    assert choose_token_budget(curve) == 256  # the knee (128) is below the floor
    assert choose_token_budget(curve, floor=100) == 128
    assert choose_token_budget({32: 0.01, 64: 0.04}) == 64  # never past the largest size measured
    assert choose_token_budget({128: 0.5, 256: 0.6, 512: 0.7}) == 512  # a knee above the floor stays


def test_table_interpolates_and_extrapolates():
    table = CalibrationTable({32: 0.01, 128: 0.02}, 1e-7, 128)
    assert table.forward_time(8) == 0.01 and abs(table.forward_time(80) - 0.015) < 1e-12
    assert abs(table.forward_time(256) - 0.04) < 1e-12
    assert abs(table.step_time(1, 1000) - (0.01 + 1e-4)) < 1e-12


def test_a_pool_too_small_for_the_timed_steps_is_its_own_key(llm):
    """A tiny pool (a test's) times other steps than a full one: the key tells them apart, and
    every pool big enough for the timed steps shares one."""
    full = scratch_blocks(10**6, 16)
    assert scratch_blocks(10**5, 16) == full and scratch_blocks(10, 16) == 10
    engine = llm.engine
    assert engine._calibration_key["scratch_blocks"] == scratch_blocks(engine.num_blocks, engine.runner.block_size)
