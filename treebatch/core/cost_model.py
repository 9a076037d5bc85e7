"""Predict a batch's run time before running it, from its plan and the machine's calibration.

`replay` runs a `BatchPlan` through the real `Scheduler` (core/scheduler.py) with a stand-in for
the model that samples a fixed token, so admission, the growth reserve, chunking, group
lifetimes, preemption and the order of the queue are the scheduler's own, not a copy of them.
Each step is priced by `CalibrationTable.step_time(tokens, context pairs, decodes)`, where the
context pairs come from the step's real layout (core/step_layout.py): a group's queries against
its shared blocks are one product over keys read once when the layout reads them once, as
shared-prefix attention does, and each decode's own keys are read per query otherwise. The same replay with prefix sharing off gives the time without sharing.

What it leaves out: stops before max_tokens (every request is assumed to generate all of them,
as under ignore_eos), tokenization, detokenization and start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from treebatch.config import RunnerConfig, SchedulerConfig
from treebatch.core.calibration_table import CalibrationTable
from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.outputs import StepResult
from treebatch.core.plan import BatchPlan, plan_batch
from treebatch.core.request import Request
from treebatch.core.scheduler import Scheduler
from treebatch.core.step_layout import layout_step
from treebatch.sampling_params import SamplingParams

_UNLIMITED_CONTEXT = 1 << 62


@dataclass(frozen=True, slots=True)
class Replay:
    seconds: float
    num_steps: int
    num_prefill_tokens: int  # prompt tokens run through the model
    num_decode_tokens: int
    num_preemptions: int


def replay(
    plan: BatchPlan,
    prompts: Sequence[Sequence[int]],
    max_tokens: Sequence[int],
    table: CalibrationTable,
    scheduler_config: SchedulerConfig,
    runner_config: RunnerConfig,
    block_size: int,
    num_kv_blocks: int | None = None,
    max_model_len: int | None = None,
) -> Replay:
    """Run the plan's steps on counts. `num_kv_blocks` None: KV never runs out;
    `max_num_batched_tokens` None in the config: the calibration's budget."""
    if scheduler_config.max_num_batched_tokens is None:
        scheduler_config = dataclasses.replace(scheduler_config, max_num_batched_tokens=table.token_budget)
    if num_kv_blocks is None:
        num_kv_blocks = sum(num_blocks_for(len(p) + n, block_size) + 1 for p, n in zip(prompts, max_tokens))
    scheduler = Scheduler(
        scheduler_config, KVCacheManager(num_kv_blocks, block_size), max_model_len or _UNLIMITED_CONTEXT
    )
    sequences = [
        Request(str(i), list(p), SamplingParams(max_tokens=n, ignore_eos=True), max_tokens=n)
        for i, (p, n) in enumerate(zip(prompts, max_tokens))
    ]
    scheduler.add_plan(plan, sequences)
    min_queries, min_decodes = runner_config.cascade_min_queries, runner_config.cascade_min_decodes
    seconds = 0.0
    steps = prefill = decode = 0
    while scheduler.has_unfinished_requests:
        step = scheduler.schedule()
        if step.is_empty:
            raise RuntimeError("replay stalled: nothing runs and nothing can start")
        layout = layout_step(step.chunks, min_queries, min_decodes)
        num_decodes = step.num_decode_tokens
        single, many = layout.context_pairs()
        seconds += table.step_time(step.num_tokens, single, num_decodes, many, layout.num_prefill_chunks)
        steps += 1
        prefill += sum(c.num_computed_prompt_tokens for c in step.chunks)
        sampled = {c.request_id: 0 for c in step.chunks if c.needs_sample}
        decode += len(sampled)
        scheduler.update(step, StepResult(sampled))
    return Replay(seconds, steps, prefill, decode, scheduler.num_preemptions)


def predict_batch_time(
    prompts: Sequence[Sequence[int]],
    max_tokens: int | Sequence[int],
    calibration: CalibrationTable | dict,
    scheduler_config: SchedulerConfig,
    runner_config: RunnerConfig,
    block_size: int,
    num_kv_blocks: int | None = None,
    max_model_len: int | None = None,
) -> dict[str, float | int]:
    """Seconds the batch should take with prefix sharing and without it, and the token counts
    behind them, planned and scheduled exactly as the engine with these configs would."""
    table = calibration if isinstance(calibration, CalibrationTable) else CalibrationTable.from_dict(calibration)
    outputs = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    assert len(outputs) == len(prompts) and all(n >= 1 for n in outputs)
    unshared_config = dataclasses.replace(scheduler_config, enable_prefix_sharing=False)
    results = []
    for config in (scheduler_config, unshared_config):
        plan = plan_batch(prompts, outputs, config, block_size)
        results.append(
            replay(plan, prompts, outputs, table, config, runner_config, block_size, num_kv_blocks, max_model_len)
        )
    shared, plain = results
    return {
        "predicted_seconds": round(shared.seconds, 4),
        "predicted_seconds_no_sharing": round(plain.seconds, 4),
        "predicted_speedup": round(plain.seconds / max(shared.seconds, 1e-12), 4),
        "num_steps": shared.num_steps,
        "num_steps_no_sharing": plain.num_steps,
        "prefill_tokens": shared.num_prefill_tokens,
        "prefill_tokens_no_sharing": plain.num_prefill_tokens,
        "decode_tokens": shared.num_decode_tokens,
        "token_budget": scheduler_config.max_num_batched_tokens or table.token_budget,
    }
