"""Measure what a forward pass costs on this machine, once, and cache it.

The per-step token budget is where throughput stops growing, and that depends on the CPU, the
thread count and the model (and on the runner's code, which keeps getting faster), so treebatch
times the loaded model at start-up instead of trusting a constant: forward passes of M prefill
tokens for M from 16 to 2048, plus decodes (each over its own blocks) and a prefill chunk, each
over a short and a long context, for the two attention terms. The result is a
`CalibrationTable`, written as JSON under `<cache root>/calibration/<key hash>.json`; the key holds the model's content fingerprint, torch's
thread count, the CPU model, the code that runs the step and the scratch KV blocks it had (a pool
too small for the timed steps times other steps), so a later start with the same key
reads the file instead of measuring (about 4 s on 2 cores for SmolLM2-135M in float32), unless
the table was measured on a machine busier than it is now (machine_cache.measured_under_load):
then it measures again and replaces it.

The timed steps go through `ModelRunner.execute` like real ones, on scratch KV blocks that are
zeroed afterwards; nothing is sampled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treebatch.core.calibration_table import MIN_TOKEN_BUDGET, CalibrationTable, choose_token_budget
from treebatch.core.outputs import ScheduledChunk, StepPlan
from treebatch.host import cpu_model
from treebatch.runtime.machine_cache import measured_under_load, pace, pace_now, paced, write_atomically

FORMAT = 8  # bump when what is measured changes, so stale files are not reused
FORWARD_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
_SEQUENCE_LEN = 256  # a prefill step is made of prompts this long (attention stays moderate)
_DECODE_BATCH = 16
_DECODE_CONTEXTS = (64, 1024)
# A prefill chunk of this many tokens at position 0 and at _CHUNK_START: the difference is its
# queries' attention over the keys before it.
_CHUNK_TOKENS, _CHUNK_START = 128, 896
# 256 tokens after a 256-token prefix as one chunk, and as 16 group members' chunks of 16.
_SHORT_CHUNKS, _SHORT_CHUNK_LEN, _GROUP_PREFIX = 16, 16, 256
# The furthest position a timed pass reaches, whatever the model's context: the model's rotary
# tables must reach it too.
MAX_POSITION = max(_DECODE_CONTEXTS[-1], _CHUNK_START + _CHUNK_TOKENS, _GROUP_PREFIX + _SHORT_CHUNK_LEN, _SEQUENCE_LEN) + 1
# The scratch group's id: no engine group has a negative id, so the runner's store of gathered
# prefixes (keyed by group id) never serves its scratch keys to a real group.
_CALIBRATION_GROUP = -1
_TIME_LIMIT_S = 4.0
# Token ids of the timed passes lie below this (any id costs the same; every vocabulary has 256).
_TOKEN_IDS = 256
FALLBACK_TOKEN_BUDGET = 512
_CODE_FILES = (
    "runtime/model_runner.py",
    "runtime/step_inputs.py",
    "core/step_layout.py",
    "layers/attention.py",
    "layers/native.py",
    "layers/kernels/paged_decode.c",
    "layers/kernels/fast_exp.h",
    "models/decoder.py",
    "models/rope.py",
    "layers/linear.py",
)

Timer = Callable[[], float]


def calibration_key(weights: dict[str, torch.Tensor], model_config: Any, dtype: str, block_size: int) -> dict[str, Any]:
    """What a measurement is valid for. The model fingerprint hashes every tensor's name, shape
    and an evenly strided sample of its values: cheap (milliseconds), and two different models
    collide only if they agree on all of those."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(model_config).encode())
    for name in sorted(weights):
        tensor = weights[name].detach().reshape(-1)
        step = max(1, tensor.numel() // 1024)
        digest.update(f"{name}{tuple(weights[name].shape)}".encode())
        digest.update(tensor[::step].float().numpy().tobytes())
    code = hashlib.blake2b(digest_size=8)
    package = Path(__file__).resolve().parent.parent
    for relative in _CODE_FILES:
        try:
            code.update((package / relative).read_bytes())
        except OSError:
            pass
    return {
        "format": FORMAT,
        "model": digest.hexdigest(),
        "dtype": dtype,
        "block_size": block_size,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "code": code.hexdigest(),
    }


def scratch_blocks(num_blocks: int, block_size: int) -> int:
    """KV blocks a measurement on a pool of `num_blocks` uses: all it needs, or all a small pool
    has. It belongs in the key: on a pool too small for the timed steps' own blocks, prompts are
    shorter and decodes share blocks (a 512-token step of a test's tiny pool took twice a full
    pool's time), which must not stand for a full pool's costs."""
    return min(num_blocks, _DECODE_BATCH * _blocks_per_sequence(block_size))


def _blocks_per_sequence(block_size: int) -> int:
    """Blocks one timed decoding sequence holds: its longest context and its new token."""
    return -(-(max(_DECODE_CONTEXTS) + 1) // block_size)


def cache_path(key: dict[str, Any], cache_dir: Path) -> Path:
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return cache_dir / "calibration" / f"{name}.json"


def load_or_measure(
    runner: Any, key: dict[str, Any], cache_dir: Path, timer: Timer = time.perf_counter,
    paces: tuple[Timer, Timer] = (pace_now, pace),
) -> CalibrationTable:
    """The cached table for `key`, or a fresh measurement (then cached) where there is none or
    it was measured under load. `paces`: the machine's pace now (for the check) and measured
    afresh (around a new measurement)."""
    path = cache_path(key, cache_dir)
    try:
        table = CalibrationTable.from_dict(json.loads(path.read_text()))
        if table.key == key and not measured_under_load(table.pace, paces[0]):
            return table
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        pass  # missing or unreadable: measure again
    table, seconds = paced(lambda: measure(runner, key, timer), paces[1])
    table = dataclasses.replace(table, pace=seconds)
    if table.is_complete:  # an interrupted measurement is not worth keeping: retry next start
        write_atomically(path, json.dumps(table.to_dict(), indent=1))
    return table


def measure(runner: Any, key: dict[str, Any] | None = None, timer: Timer = time.perf_counter) -> CalibrationTable:
    block_size = runner.block_size
    num_blocks = runner.kv_cache.shape[2] // block_size
    sequence_len = max(1, min(_SEQUENCE_LEN, num_blocks * block_size - 1))
    blocks_per_sequence = _blocks_per_sequence(block_size)
    # Each decoding sequence reads its own blocks, as in a real batch: sixteen sequences over the
    # same blocks would read one sequence's keys from the cache sixteen times, and price the
    # keys, which in a run come from memory, three times too cheap (measured). Tiny test pools
    # reuse blocks.
    tables = [
        [(s * blocks_per_sequence + b) % num_blocks for b in range(blocks_per_sequence)]
        for s in range(_DECODE_BATCH)
    ]
    table = tables[0]
    used = scratch_blocks(num_blocks, block_size)
    try:
        _execute(runner, _prefill_plan(16, sequence_len, table))  # the first call pays one-off costs
        forward, is_complete = _forward_curve(runner, sequence_len, table, timer)
        short, long = (
            _best_time(runner, _decode_plan(c, tables), timer) for c in _DECODE_CONTEXTS
        )
        chunk_short, chunk_long = (
            _best_time(runner, _chunk_plan(_CHUNK_TOKENS, start, table), timer) for start in (0, _CHUNK_START)
        )
        # The same tokens after the same 256 cached keys, as one chunk and as the short chunks
        # of 16 members of a prefix group: what a chunk costs beyond its tokens.
        tokens = _SHORT_CHUNKS * _SHORT_CHUNK_LEN
        one_chunk = _best_time(runner, _chunk_plan(tokens, _GROUP_PREFIX, table), timer)
        many_chunks = _best_time(runner, _group_plan(tables, block_size), timer)
    finally:
        runner.kv_cache[:, :, : used * block_size] = 0  # scratch KV back to zeros
    pairs = _DECODE_BATCH * (_DECODE_CONTEXTS[1] - _DECODE_CONTEXTS[0])
    per_pair = max(0.0, (long - short) / pairs)
    per_chunk_pair = max(0.0, (chunk_long - chunk_short) / (_CHUNK_TOKENS * _CHUNK_START))
    per_chunk = max(0.0, (many_chunks - one_chunk) / (_SHORT_CHUNKS - 1))
    partial = CalibrationTable(forward, per_pair, 1)
    # What the short-context decodes cost beyond as many prompt tokens and their keys.
    short_pairs = _DECODE_BATCH * (_DECODE_CONTEXTS[0] + 1)
    per_decode = max(0.0, (short - partial.step_time(_DECODE_BATCH, short_pairs)) / _DECODE_BATCH)
    per_decode += _sample_seconds(runner, timer)  # the timed steps sample nothing
    return CalibrationTable(
        forward_seconds=forward,
        seconds_per_context_pair=per_pair,
        # A curve cut short by the time limit (a busy or slow machine) does not show where
        # throughput stops growing: fall back to a budget that is sound on any CPU.
        token_budget=choose_token_budget(forward) if is_complete else FALLBACK_TOKEN_BUDGET,
        key=dict(key or {}),
        is_complete=is_complete,
        seconds_per_decode=per_decode,
        seconds_per_chunk_pair=per_chunk_pair,
        seconds_per_chunk=per_chunk,
    )


def warm_up(runner: Any) -> None:
    """Forward passes of 16 and 64 tokens on scratch blocks, which it zeroes again: the first
    pass over a step size pays one-off costs (weights read from their memory-mapped file for
    the first time, allocator growth; 1.2 s on the first 1,024-token step of a run, measured),
    which belong to start-up, not to the first step of the batch. Two sizes, so that where the
    projections' measured crossover lies between them (layers/linear.py) both copies of every
    weight are touched."""
    block_size = runner.block_size
    num_blocks = runner.kv_cache.shape[2] // block_size
    table = [b % num_blocks for b in range(64 // block_size + 1)]
    try:
        for num_tokens in (16, 64):
            _execute(runner, _prefill_plan(num_tokens, min(num_tokens, num_blocks * block_size - 1), table))
    finally:
        runner.kv_cache[:, :, : len(table) * block_size] = 0


def _forward_curve(
    runner: Any, sequence_len: int, table: list[int], timer: Timer
) -> tuple[dict[int, float], bool]:
    """Seconds per forward pass for growing sizes. Stops once two sizes in a row gained under 5%
    tokens/s on the best so far (the knee is behind us), or when the time spent passes
    `_TIME_LIMIT_S`: a start-up measurement must stay a few seconds. Returns the curve and
    whether it is complete: flattened (twice, or once when time ran out), or measured to the
    largest size. Sizes from 128 tokens are timed once: they run long enough for one run to tell."""
    forward: dict[int, float] = {}
    best_rate, flat, began = 0.0, 0, timer()
    for m in FORWARD_SIZES:
        forward[m] = _best_time(runner, _prefill_plan(m, sequence_len, table), timer, repeats=2 if m < 128 else 1)
        rate = m / forward[m]
        flat = flat + 1 if rate < 1.05 * best_rate else 0
        best_rate = max(best_rate, rate)
        # Not before twice the budget's floor: a noisy flat stretch at 64-128 tokens would
        # otherwise end the curve, and the budget, below the floor.
        if flat >= 2 and m >= 2 * MIN_TOKEN_BUDGET:
            return forward, True
        if timer() - began > _TIME_LIMIT_S:
            return forward, flat >= 1 or m == FORWARD_SIZES[-1]
    return forward, True


def _sample_seconds(runner: Any, timer: Timer, rows: int = _DECODE_BATCH) -> float:
    """What sampling one token adds to a step: the vocabulary projection of its row and a greedy
    pick (about a fifth of a small decode step for a 135M model with a 49k vocabulary)."""
    model = getattr(runner, "model", None)
    head = getattr(model, "head", None)
    if head is None:
        return 0.0
    hidden = torch.randn(rows, head.in_features, dtype=head.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            start = timer()
            head(hidden).float().argmax(dim=-1)
            best = min(best, timer() - start)
    return best / rows


def _best_time(runner: Any, plan: StepPlan, timer: Timer, repeats: int = 2) -> float:
    """The fastest of a few runs: other processes on the machine only ever add time."""
    best = float("inf")
    for _ in range(repeats):
        start = timer()
        _execute(runner, plan)
        best = min(best, timer() - start)
    return max(best, 1e-9)


def _execute(runner: Any, plan: StepPlan) -> None:
    with torch.inference_mode():
        runner.execute(plan)


def _prefill_plan(num_tokens: int, sequence_len: int, block_table: list[int]) -> StepPlan:
    """`num_tokens` prompt tokens as prompts of `sequence_len` from position 0, all on the same
    scratch blocks (their keys overwrite each other, which does not change the work)."""
    rng = np.random.default_rng(num_tokens)
    chunks = []
    for index, start in enumerate(range(0, num_tokens, sequence_len)):
        length = min(sequence_len, num_tokens - start)
        ids = rng.integers(1, _TOKEN_IDS, size=length).tolist()
        chunks.append(ScheduledChunk(f"calibration-{index}", ids, 0, block_table, False, 0))
    return StepPlan(chunks)


def _chunk_plan(num_tokens: int, start: int, block_table: list[int]) -> StepPlan:
    ids = np.random.default_rng(start).integers(1, _TOKEN_IDS, size=num_tokens).tolist()
    return StepPlan([ScheduledChunk("calibration-chunk", ids, start, block_table, False, 0)])


def _group_plan(block_tables: list[list[int]], block_size: int) -> StepPlan:
    """_SHORT_CHUNKS members of one group, each a _SHORT_CHUNK_LEN-token chunk after the group's
    _GROUP_PREFIX shared tokens (the first table's blocks), each in blocks of its own after them."""
    num_shared = _GROUP_PREFIX // block_size
    shared = block_tables[0][:num_shared]
    own = -(-_SHORT_CHUNK_LEN // block_size)
    rng = np.random.default_rng(_GROUP_PREFIX)
    chunks = [
        ScheduledChunk(f"calibration-member-{i}", rng.integers(1, _TOKEN_IDS, size=_SHORT_CHUNK_LEN).tolist(),
                       _GROUP_PREFIX, shared + table[num_shared : num_shared + own], False, 0,
                       group_id=_CALIBRATION_GROUP, num_shared_tokens=_GROUP_PREFIX)
        for i, table in zip(range(_SHORT_CHUNKS), block_tables)
    ]
    return StepPlan(chunks)


def _decode_plan(context: int, block_tables: list[list[int]]) -> StepPlan:
    chunks = [
        ScheduledChunk(f"calibration-{i}", [1 + i % (_TOKEN_IDS - 1)], context, table, False, 0) for i, table in enumerate(block_tables)
    ]
    return StepPlan(chunks)
