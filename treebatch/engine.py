"""LLMEngine: model, tokenizer, KV cache, scheduler and runner wired into one step loop."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch

from treebatch.config import EngineConfig
from treebatch.core.calibration_table import CalibrationTable
from treebatch.core.cost_model import predict_batch_time
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.outputs import StepPlan
from treebatch.core.plan import BatchPlan, plan_batch, rescaled_estimates, warmup_sample
from treebatch.core.request import Request, RequestStatus
from treebatch.core.scheduler import Scheduler
from treebatch.host import cache_root
from treebatch.models.decoder import DecoderForCausalLM
from treebatch.models.loader import load_model
from treebatch.runtime.guidance import Guide
from treebatch.runtime.calibration import MAX_POSITION, calibration_key, load_or_measure, scratch_blocks, warm_up
from treebatch.runtime import kernel_choice
from treebatch.runtime.kv_cache import allocate_kv_cache, available_memory_bytes, num_kv_blocks
from treebatch.runtime.memory import check_fits, memory_need
from treebatch.runtime.model_runner import ModelRunner
from treebatch.runtime.precision import resolve_dtype
from treebatch.output_processor import OutputProcessor
from treebatch.tokenizer import load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineStats:
    """Counters of one run; `summary()` is what users read after `generate`."""

    num_requests: int = 0
    num_prompt_tokens: int = 0  # logical: every prompt token of every sequence
    num_computed_prompt_tokens: int = 0  # prompt tokens actually run through the model
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0  # Scheduler.num_preemptions (the one count) since these stats began
    preemptions_at_start: int | None = None  # Scheduler.num_preemptions at the first step
    peak_kv_usage: float = 0.0
    peak_kv_blocks: int = 0  # the most KV blocks in use at once (BlockPool.peak_used_blocks)
    num_forced_tokens: int = 0  # output tokens a grammar forced (jump-forward), not sampled
    num_unique_prompt_tokens: int = 0  # the prefix tree's optimum (0: not planned)
    num_groups: int = 0
    share_histogram: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def summary(self) -> dict[str, float | int]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        logical = max(self.num_prompt_tokens, 1)
        return {
            "requests": self.num_requests,
            "prompt_tokens": self.num_prompt_tokens,
            "computed_prompt_tokens": self.num_computed_prompt_tokens,
            "unique_prompt_tokens": self.num_unique_prompt_tokens,
            "saving_ratio": round(1.0 - self.num_computed_prompt_tokens / logical, 4),
            "groups": self.num_groups,
            "share_histogram": dict(sorted(self.share_histogram.items())),
            "generated_tokens": self.num_generated_tokens,
            "steps": self.num_steps,
            "preemptions": self.num_preemptions,
            "peak_kv_usage": round(self.peak_kv_usage, 4),
            "peak_kv_blocks": self.peak_kv_blocks,
            "forced_tokens": self.num_forced_tokens,
            "elapsed_s": round(elapsed, 3),
            "generated_tokens_per_s": round(self.num_generated_tokens / elapsed, 2),
            "total_tokens_per_s": round(
                (self.num_prompt_tokens + self.num_generated_tokens) / elapsed, 2
            ),
        }


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        loaded = load_model(config.model)
        self.model_name = loaded.name
        self.model_config = loaded.config
        self.tokenizer = load_tokenizer(config.tokenizer or loaded.tokenizer_path, loaded.chat_template)
        self.max_model_len = min(config.max_model_len or loaded.context_length, loaded.context_length)
        self.eos_token_ids = loaded.config.eos_token_ids
        self.dtype = resolve_dtype(config.dtype)  # "auto" decided for this machine
        dtype = _DTYPES[self.dtype]
        c = loaded.config
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        layer = [(c.hidden_size, qkv), (c.num_heads * c.head_dim, c.hidden_size),
                 (c.hidden_size, 2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)]
        self.kernels = kernel_choice.choose(dtype, c.hidden_size, 2 * c.intermediate_size, layer)  # measured here
        # The weights are still memory-mapped here: refuse a model that cannot fit before
        # converting any of them.
        self.memory_need = memory_need(c, dtype.itemsize, self.kernels.copies, self.max_model_len,
                                       available_memory_bytes())
        check_fits(self.memory_need, loaded.name, self.dtype)
        self._calibration_key = calibration_key(loaded.weights, c, self.dtype, config.cache.block_size)
        self._calibration_key["packed_max_rows"] = self.kernels.packed_max_rows  # another choice, other step costs
        self._calibration_key["native_max_rows"] = self.kernels.native_max_rows
        self._calibration_key["attention_amx"] = kernel_choice.attention_amx(dtype, c.num_heads, c.num_kv_heads,
                                                                             c.head_dim)
        positions = max(self.max_model_len, MAX_POSITION)  # start-up timing runs past a short context
        model = DecoderForCausalLM(c, loaded.weights, dtype, positions, self.kernels)
        del loaded

        block_size = config.cache.block_size
        self.num_blocks = num_kv_blocks(self.model_config, config.cache, dtype)
        self._calibration_key["scratch_blocks"] = scratch_blocks(self.num_blocks, block_size)
        # When every layer has a sliding window, blocks that leave it go back to the pool and
        # their table entries name one more block past the pool's (KVCacheManager.null_block).
        window = self.model_config.max_window
        kv_cache = allocate_kv_cache(self.model_config, self.num_blocks + (window is not None), block_size, dtype)
        vocab_size = c.vocab_size
        guide = lambda: Guide(self.tokenizer, vocab_size, self.eos_token_ids)  # noqa: E731  (on first use)
        self.runner = ModelRunner(model, kv_cache, block_size, self.eos_token_ids, config.runner, guide)
        warm_up(self.runner)  # one-off first-pass costs belong to start-up, not to the first step
        # The configs as they run: the runner's thresholds and the token budget resolved for
        # this machine. The scheduler, the runner and the cost model all read these.
        self.runner_config = self.runner.config
        self._calibration: CalibrationTable | None = None
        self.scheduler_config = config.scheduler
        if self.scheduler_config.max_num_batched_tokens is None:
            self.scheduler_config = dataclasses.replace(
                config.scheduler, max_num_batched_tokens=self.calibration.token_budget
            )
        kv_manager = KVCacheManager(self.num_blocks, block_size, window)
        self.scheduler = Scheduler(self.scheduler_config, kv_manager, self.max_model_len)
        self._trace = open(config.trace_file, "w", buffering=1) if config.trace_file else None
        self._num_traced_steps = 0
        # A batch waiting for its warm-up sample to finish: (sequences, their plan, the sample).
        self._deferred: tuple[list[Request], BatchPlan, list[int]] | None = None
        self.output_processor = OutputProcessor(self.tokenizer)  # a state per live sampling request
        self.stats = EngineStats()

    @property
    def calibration(self) -> CalibrationTable:
        """This machine's forward-pass costs for the loaded model: read from the cache, measured
        (a few seconds) when missing."""
        if self._calibration is None:
            self._calibration = load_or_measure(self.runner, self._calibration_key, cache_root())
        return self._calibration

    @property
    def token_budget(self) -> int:
        return self.scheduler.token_budget

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.scheduler.kv.pool.reset_peak()

    def _register(self, request: Request) -> None:
        """A request the scheduler has queued (`Scheduler.add_plan`): count it, track it."""
        if not request.is_prefix:
            self.output_processor.add_request(request)
            self.stats.num_requests += 1
            self.stats.num_prompt_tokens += request.num_prompt_tokens

    def _forget(self, request: Request) -> None:
        self.output_processor.discard(request.request_id)

    def plan(self, requests: list[Request]) -> BatchPlan:
        """The batch's plan with this engine's settings (prefix tree, groups, order)."""
        return plan_batch(
            [r.prompt_token_ids for r in requests],
            [r.estimated_output_tokens for r in requests],
            self.scheduler_config,
            self.config.cache.block_size,
        )

    def add_requests(self, requests: list[Request]) -> None:
        """Add a whole batch: planned over the prefix tree, in the order policy's order. When the
        policy weighs output lengths that are not known (no ignore_eos), a small warm-up sample
        of the batch runs first and the rest is planned once it is done."""
        plan = self.plan(requests)
        sample = [] if self._deferred is not None else warmup_sample(
            plan, self.scheduler_config.order_policy, any(not r.sampling_params.ignore_eos for r in requests)
        )
        if sample:
            self._deferred = (requests, plan, sample)
            chosen = [requests[i] for i in sample]
            self._add_plan(self.plan(chosen), chosen)
        else:
            self._add_plan(plan, requests)

    def _add_plan(self, plan: BatchPlan, requests: list[Request]) -> None:
        for request in self.scheduler.add_plan(plan, requests):
            self._register(request)
        summary = plan.summary
        self.stats.num_unique_prompt_tokens += summary.num_unique_tokens
        self.stats.num_groups += summary.num_groups
        for share, count in summary.share_histogram:
            self.stats.share_histogram[share] = self.stats.share_histogram.get(share, 0) + count

    def _start_deferred_if_ready(self) -> None:
        """Once the warm-up sample is done, plan the rest of its batch with the measured lengths."""
        if self._deferred is None or self.scheduler.has_unfinished_requests:
            return
        requests, plan, sample = self._deferred
        self._deferred = None
        estimates = rescaled_estimates(
            plan,
            sample,
            [requests[i].num_output_tokens for i in sample],
            [r.max_tokens for r in requests],
            [r.sampling_params.ignore_eos for r in requests],
        )
        chosen = set(sample)
        rest = [r for i, r in enumerate(requests) if i not in chosen]
        for i, request in enumerate(requests):
            if i not in chosen:
                request.estimated_output_tokens = estimates[i]
        self._add_plan(self.plan(rest), rest)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests or self._deferred is not None

    def abort(self, request_ids: list[str]) -> None:
        """Drop unfinished requests (and a batch still waiting for its warm-up sample)."""
        self._deferred = None
        for request in self.scheduler.abort(request_ids):
            self._forget(request)

    def predict(self, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, float | int]:
        """The cost model's prediction for a batch on this engine: its calibration, resolved
        budget, policy, runner thresholds and KV size."""
        return predict_batch_time(
            prompts, max_tokens, self.calibration, self.scheduler_config, self.runner_config,
            self.config.cache.block_size, self.num_blocks, self.max_model_len,
        )

    def step(self) -> list[Request]:
        """One step: schedule -> execute -> update -> process outputs. Returns the requests that
        finished in it; their completions wait in `output_processor` (`pop(request_id)`)."""
        started = time.perf_counter()
        self._start_deferred_if_ready()
        scheduler = self.scheduler
        stats = self.stats
        if stats.preemptions_at_start is None:
            stats.preemptions_at_start = scheduler.num_preemptions
        plan = scheduler.schedule()
        queues = self._queue_counts() if self._trace is not None else (0, 0, 0)
        if plan.is_empty:
            if scheduler.has_unfinished_requests:
                raise RuntimeError("the scheduler planned nothing while requests wait: KV too small")
            self.runner.execute(plan)  # lets the runner drop finished requests' state
            return []
        # The scheduler holds the one registry of live requests; `update` drops the finished ones
        # (and completed group prefixes) from it, so the step's requests are looked up first.
        requests = [scheduler.requests[chunk.request_id] for chunk in plan.chunks]
        num_outputs = [request.num_output_tokens for request in requests]
        result = self.runner.execute(plan)
        finished = scheduler.update(plan, result)

        stats.num_steps += 1
        stats.num_generated_tokens += sum(r.num_output_tokens - n for r, n in zip(requests, num_outputs))
        stats.num_forced_tokens += sum(map(len, result.forced_token_ids.values()))
        stats.num_preemptions = scheduler.num_preemptions - stats.preemptions_at_start
        stats.peak_kv_usage = max(stats.peak_kv_usage, scheduler.kv.usage)
        stats.peak_kv_blocks = max(stats.peak_kv_blocks, scheduler.kv.pool.peak_used_blocks)
        processor = self.output_processor
        for chunk, request, before in zip(plan.chunks, requests, num_outputs):
            stats.num_computed_prompt_tokens += chunk.num_computed_prompt_tokens
            # Every new output token (sampled, or forced by a grammar) goes to the output
            # processor, also the one that ended its request.
            for token in request.output_token_ids[before:] if chunk.needs_sample else ():
                if processor.add_token(chunk.request_id, token):
                    if not request.is_finished:  # a stop string
                        scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
                        finished.append(request)
                    break
        for request in finished:
            processor.finish(request)
        if self.config.check_integrity:
            scheduler.check_integrity()
        if self._trace is not None:
            self._write_trace(plan, queues, time.perf_counter() - started)
        return finished

    def _queue_counts(self) -> tuple[int, int, int]:
        """Running, waiting and KV blocks in use, as the step was planned (before finished
        requests free theirs)."""
        kv = self.scheduler.kv
        return len(self.scheduler.running), len(self.scheduler.waiting), kv.pool.num_blocks - kv.num_free_blocks

    def _write_trace(self, plan: StepPlan, queues: tuple[int, int, int], seconds: float) -> None:
        """One JSON line per step; running, waiting and KV blocks in use are counted as the step
        was planned (its KV allocated, before finished requests free theirs)."""
        scheduler = self.scheduler
        num_decode = plan.num_decode_tokens
        record = {
            "step": self._num_traced_steps,
            "num_tokens": plan.num_tokens,
            "num_decode_tokens": num_decode,
            "num_prefill_tokens": plan.num_tokens - num_decode,
            "num_chunks": len(plan.chunks),
            "num_running": queues[0],
            "num_waiting": queues[1],
            "num_preempted": len(plan.preempted_request_ids),
            "token_budget": scheduler.token_budget,
            "kv_used_blocks": queues[2],
            "kv_total_blocks": scheduler.kv.pool.num_blocks,
            "step_time_s": round(seconds, 6),
        }
        self._num_traced_steps += 1
        self._trace.write(json.dumps(record) + "\n")
