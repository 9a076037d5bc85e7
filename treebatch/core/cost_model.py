"""Predict a batch's run time before running it, from the plan and the machine's calibration.

`predict_batch_time` plans the batch exactly as the engine does (prefix tree, groups, order
policy), then replays the scheduler's step loop on counts alone: each step runs every running
decode and fills the rest of the token budget with prefill chunks in queue order (a group's
members start the step after its prefix is complete), and costs
`CalibrationTable.step_time(tokens, context pairs)`. Stretches of decode-only steps are summed in
closed form, so a prediction takes milliseconds even for large batches. The same replay with
every prompt computed whole, in input order, gives the time without sharing.

Attention is charged per (query, key) pair read from the cache, except that the keys in a group's
shared full blocks count once per group and step when the group has `cascade_min_queries` queries
in the step (shared-prefix attention reads them once for all members). What it leaves out: stops
before max_tokens (every
request is assumed to generate all of them, as under ignore_eos), tokenization, sampling details
and start-up. KV is modelled only when `num_kv_blocks` is given: a request then reserves blocks
for its whole length when it starts, and a group's prefix blocks stay until the group is done.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treebatch.core.batch_plan import plan_requests
from treebatch.core.calibration_table import CalibrationTable
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.request import Request
from treebatch.sampling_params import SamplingParams


@dataclass(slots=True)
class _Work:
    """One queue entry, reduced to what the step loop needs."""

    prefill: int  # prompt tokens this entry computes
    start: int  # position of its first computed token (what its chunks attend to before them)
    outputs: int  # tokens it generates (0 for a group's prefix)
    waits_for: int | None  # queue index of the prefix that must be complete before it starts
    group: int | None = None  # the group whose prefix KV it reads (shared-prefix attention)
    shared: int = 0  # leading positions in that group's full blocks: read once per group and step


def predict_batch_time(
    prompts: Sequence[Sequence[int]],
    max_tokens: int | Sequence[int],
    calibration: CalibrationTable | dict[str, Any],
    *,
    token_budget: int | None = None,
    block_size: int = 16,
    min_shared_prefix_tokens: int = 8,
    order_policy: str = "dfs",
    max_num_seqs: int = 1024,
    num_kv_blocks: int | None = None,
    cascade_min_queries: int | None = 4,
) -> dict[str, float | int]:
    """Seconds the batch should take with prefix sharing and without it, and the token counts
    behind them. `token_budget`: None takes the calibration's measured one."""
    table = calibration if isinstance(calibration, CalibrationTable) else CalibrationTable.from_dict(calibration)
    budget = token_budget or table.token_budget
    outputs = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    assert len(outputs) == len(prompts) and all(n >= 1 for n in outputs)
    shared = _shared_queue(prompts, outputs, block_size, min_shared_prefix_tokens, order_policy)
    plain = [_Work(len(p), 0, n, None) for p, n in zip(prompts, outputs)]
    with_sharing = _replay(shared, table, budget, max_num_seqs, block_size, num_kv_blocks, cascade_min_queries)
    without = _replay(plain, table, budget, max_num_seqs, block_size, num_kv_blocks, cascade_min_queries)
    return {
        "predicted_seconds": round(with_sharing["seconds"], 4),
        "predicted_seconds_no_sharing": round(without["seconds"], 4),
        "predicted_speedup": round(without["seconds"] / max(with_sharing["seconds"], 1e-12), 4),
        "num_steps": with_sharing["steps"],
        "num_steps_no_sharing": without["steps"],
        "prefill_tokens": sum(w.prefill for w in shared),
        "prefill_tokens_no_sharing": sum(w.prefill for w in plain),
        "decode_tokens": sum(outputs),
        "token_budget": budget,
    }


def _shared_queue(
    prompts: Sequence[Sequence[int]], outputs: list[int], block_size: int, min_prefix_tokens: int, policy: str
) -> list[_Work]:
    """The engine's queue for the batch (same planner, same policy), as `_Work` entries."""
    requests = [
        Request(str(i), list(p), SamplingParams(max_tokens=n, ignore_eos=True), max_tokens=n)
        for i, (p, n) in enumerate(zip(prompts, outputs))
    ]
    if len(requests) < 2:
        return [_Work(len(p), 0, n, None) for p, n in zip(prompts, outputs)]
    groups = GroupManager(KVCacheManager(1, block_size))  # scratch: the planner only registers groups
    queue, _ = plan_requests(requests, groups, block_size, min_prefix_tokens=min_prefix_tokens, order_policy=policy)
    prefix_index: dict[int, int] = {}
    work = []
    for index, request in enumerate(queue):
        start = 0 if request.group_id is None else groups.groups[request.group_id].prefix_end
        waits_for = None if request.group_id is None else prefix_index[request.group_id]
        if request.is_prefix:
            prefix_index[request.prefix_of] = index
        outputs_of = 0 if request.is_prefix else request.max_tokens
        shared = start - start % block_size
        work.append(_Work(request.num_prompt_tokens - start, start, outputs_of, waits_for, request.group_id, shared))
    return work


def _replay(
    queue: list[_Work],
    table: CalibrationTable,
    budget: int,
    max_num_seqs: int,
    block_size: int,
    num_kv_blocks: int | None,
    cascade_min_queries: int | None,
) -> dict[str, float]:
    """Replay the scheduler's steps on counts: the predicted seconds and number of steps."""
    seconds = 0.0
    step = 0
    next_item = 0
    prefilling: list[list[int]] = []  # [queue index, prompt tokens done], in admission order
    decodes: list[tuple[int, int, int]] = []  # heap of (last step, own keys after it, index)
    context_sum = 0  # keys the running decodes attend to this step, beyond their group's shared ones
    group_decodes: dict[int, int] = {}  # group -> running decodes that read its shared keys
    shared_of: dict[int, int] = {w.group: w.shared for w in queue if w.group is not None and w.shared}
    done_at: dict[int, int] = {}  # prefix queue index -> step its last chunk ran
    kv = _KVModel(queue, block_size, num_kv_blocks)

    def shared_pairs(chunk_queries: dict[int, int]) -> int:
        """Keys read from groups' shared blocks: once per group with enough queries."""
        total = 0
        for group in set(group_decodes) | set(chunk_queries):
            queries = group_decodes.get(group, 0) + chunk_queries.get(group, 0)
            once = cascade_min_queries is not None and queries >= cascade_min_queries
            total += shared_of[group] * (1 if once else queries)
        return total

    def finish_decode(index: int, own_context: int) -> None:
        nonlocal context_sum
        context_sum -= own_context
        group = queue[index].group
        if group in shared_of:
            group_decodes[group] -= 1
            if not group_decodes[group]:
                del group_decodes[group]
        kv.finish(index)

    while next_item < len(queue) or prefilling or decodes:
        num_decodes = len(decodes)
        left = budget - num_decodes
        pairs = context_sum
        chunk_queries: dict[int, int] = {}
        completed: list[list[int]] = []

        def run_chunk(entry: list[int]) -> int:
            nonlocal pairs
            work = queue[entry[0]]
            n = min(work.prefill - entry[1], left)
            pairs += n * (work.start + entry[1] - work.shared)
            if work.group in shared_of:
                chunk_queries[work.group] = chunk_queries.get(work.group, 0) + n
            entry[1] += n
            if entry[1] == work.prefill:
                completed.append(entry)
            return n

        chunk_tokens = 0
        for entry in prefilling:  # running prefills first, in admission order
            if left <= 0:
                break
            n = run_chunk(entry)
            left -= n
            chunk_tokens += n
        while (  # then admissions; a member waits for its group's prefix to be complete
            left > 0
            and next_item < len(queue)
            and num_decodes + len(prefilling) < max_num_seqs
            and _is_ready(queue[next_item], done_at, step)
            and kv.admit(next_item)
        ):
            entry = [next_item, 0]
            prefilling.append(entry)
            next_item += 1
            n = run_chunk(entry)
            left -= n
            chunk_tokens += n

        if chunk_tokens == 0:
            if num_decodes == 0:
                raise RuntimeError("replay stalled: nothing runs and nothing can start")
            # Decode-only until the next request finishes (nothing can start before): closed form.
            k = decodes[0][0] - step + 1
            seconds += k * table.step_time(num_decodes, context_sum + shared_pairs({}), num_decodes)
            seconds += table.seconds_per_context_pair * (num_decodes * k * (k - 1) // 2)  # contexts grow
            context_sum += k * num_decodes
            step += k
            while decodes and decodes[0][0] < step:
                _, own, index = heapq.heappop(decodes)
                finish_decode(index, own)
            continue

        seconds += table.step_time(num_decodes + chunk_tokens, pairs + shared_pairs(chunk_queries), num_decodes)
        context_sum += num_decodes
        for entry in completed:
            prefilling.remove(entry)
            work = queue[entry[0]]
            if work.outputs == 0:  # a group's prefix: members may start next step
                done_at[entry[0]] = step
                kv.finish(entry[0])
            elif work.outputs == 1:  # the last chunk sampled the only output
                kv.finish(entry[0])
            else:  # the rest are decodes, one per step, attending length+1, +2, ... keys
                own = work.start + work.prefill + 1 - work.shared
                heapq.heappush(decodes, (step + work.outputs - 1, own + work.outputs - 1, entry[0]))
                context_sum += own
                if work.group in shared_of:
                    group_decodes[work.group] = group_decodes.get(work.group, 0) + 1
        step += 1
        while decodes and decodes[0][0] < step:
            _, own, index = heapq.heappop(decodes)
            finish_decode(index, own)
    return {"seconds": seconds, "steps": step}


def _is_ready(work: _Work, done_at: dict[int, int], step: int) -> bool:
    return work.waits_for is None or done_at.get(work.waits_for, step) < step


class _KVModel:
    """Blocks reserved per running entry for its whole length; a prefix's blocks stay reserved
    until every entry that starts from it has finished. Without a block count: no limit."""

    def __init__(self, queue: list[_Work], block_size: int, num_blocks: int | None) -> None:
        self.queue = queue
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.used = 0
        self.running = 0
        self.pending: dict[int, int] = {}  # prefix queue index -> entries still holding its KV
        for work in queue:
            if work.waits_for is not None:
                self.pending[work.waits_for] = self.pending.get(work.waits_for, 0) + 1

    def _need(self, index: int) -> int:
        work = self.queue[index]
        return num_blocks_for(work.start + work.prefill + work.outputs, self.block_size) - work.start // self.block_size

    def could_admit(self, index: int) -> bool:
        return self.num_blocks is None or self.used + self._need(index) <= self.num_blocks or not self.running

    def admit(self, index: int) -> bool:
        if not self.could_admit(index):
            return False
        if self.num_blocks is not None:
            self.used += self._need(index)
        self.running += 1
        return True

    def has_running(self) -> bool:
        return self.running > 0

    def finish(self, index: int) -> None:
        """Entry `index` is done computing (a prefix: its blocks stay for its group) or
        generating (a request: its own blocks go, and its share of the prefixes above it)."""
        self.running -= 1
        work = self.queue[index]
        if self.num_blocks is None or work.outputs == 0:
            return
        self.used -= self._need(index)
        if work.waits_for is not None:
            self._release_prefix(work.waits_for)

    def _release_prefix(self, prefix: int | None) -> None:
        while prefix is not None:
            self.pending[prefix] -= 1
            if self.pending[prefix]:
                return
            self.used -= self._need(prefix)
            prefix = self.queue[prefix].waits_for
