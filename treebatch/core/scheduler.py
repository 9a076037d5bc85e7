"""Scheduler: continuous batching under a per-step token budget, over a paged KV cache.

Each step packs the running requests first (their decodes and unfinished prefill chunks, in
admission order), then admits waiting requests while the token budget, the running-request limit
and free KV blocks allow, cutting a long prompt into chunks. When a running request cannot get a
block for its next token, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the head of the queue to recompute its prompt and outputs later
(recompute preemption keeps the output exact, since sampled tokens are kept, not redrawn).
"""

from __future__ import annotations

from collections import deque

from treebatch.config import SchedulerConfig
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager
from treebatch.core.outputs import NewRequestData, ScheduledChunk, StepPlan, StepResult
from treebatch.core.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_manager
        self.groups = GroupManager(kv_manager)
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._announced: set[str] = set()  # requests whose NewRequestData the runner has had
        self._finished_ids: list[str] = []  # finished since the last plan
        self.num_preemptions = 0

    # -- queue -----------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens does "
                f"not fit the model's context of {self.max_model_len} tokens"
            )
        longest = min(request.max_num_tokens, self.max_model_len)
        if not self.kv.fits_at_all(longest):
            raise ValueError(
                f"request {request.request_id!r} needs KV for {longest} tokens, more than the whole "
                f"cache holds ({self.kv.pool.num_blocks} blocks of {self.kv.block_size}); "
                "raise kv_cache_memory or lower max_tokens"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled_count = 0

        # Running requests first, oldest admission first; preemption takes from the back.
        while scheduled_count < len(self.running) and budget > 0:
            request = self.running[scheduled_count]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                break
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                scheduled_count += 1
                continue
            break  # the request itself was preempted: nothing behind it remains

        # Then admit waiting requests, unless this step already had to preempt. The queue is in
        # plan order (a group's prefix, then its members and child groups); a request whose group
        # is still computing its prefix is stepped over, a bounded number of times per step.
        block_copies: list[tuple[int, int, int]] = []
        if not preempted:
            index = skipped = 0
            while (
                index < len(self.waiting)
                and budget > 0
                and len(self.running) < self.config.max_num_seqs
                and skipped <= self.config.max_num_seqs
            ):
                request = self.waiting[index]
                if not self.groups.is_ready(request.group_id):
                    index += 1
                    skipped += 1
                    continue
                num_new = self._admit(request, budget, block_copies)
                if num_new == 0:
                    break
                del self.waiting[index]
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                chunks.append(self._chunk(request, num_new))
                budget -= num_new

        new_requests = []
        for chunk in chunks:
            if chunk.request_id not in self._announced and not self.requests[chunk.request_id].is_prefix:
                self._announced.add(chunk.request_id)
                request = self.requests[chunk.request_id]
                new_requests.append(
                    NewRequestData(
                        request.request_id,
                        request.sampling_params,
                        request.prompt_token_ids,
                        request.seed,
                    )
                )
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(chunks, new_requests, finished, preempted, block_copies)

    def _admit(self, request: Request, budget: int, block_copies: list[tuple[int, int, int]]) -> int:
        """Give a waiting request KV for its first chunk and return the chunk's size: ask, then
        commit; 0 (refused) changes nothing."""
        if request.is_prefix and request.num_computed_tokens == 0 and not self.groups.can_admit_prefix(request):
            return 0
        attaches = request.group_id is not None and request.num_computed_tokens == 0
        copy = None
        if attaches:
            if not self.groups.can_attach(request):
                return 0
            copy = self.groups.attach(request)
        num_new = self._num_new_tokens(request, budget)
        if num_new == 0 or not self.kv.allocate_slots(request, num_new):
            if attaches:  # undo the attach
                self.kv.free(request)
                request.num_computed_tokens = request.num_cached_tokens = 0
            return 0
        if copy is not None:
            block_copies.append(copy)
        return num_new

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens_to_compute
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        request.num_computed_tokens = start + num_new
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, start + num_new),
            start_position=start,
            block_table=self.kv.block_tables[request.request_id],
            needs_sample=start + num_new == request.num_tokens and not request.is_prefix,
            num_output_tokens=request.num_output_tokens,
            group_id=request.group_id,
            num_shared_tokens=self.groups.num_shared_tokens(request.group_id),
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)  # shared blocks lose one reference; the group keeps them alive
        request.num_computed_tokens = request.num_cached_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # -- results ---------------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append sampled tokens, apply token-level stops; return the requests that finished."""
        finished: list[Request] = []
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            if request.is_prefix and request.num_computed_tokens == request.num_tokens:
                self._complete_prefix(request)
            if not chunk.needs_sample:
                continue
            request.append_output_token(result.sampled_token_ids[chunk.request_id])
            if chunk.request_id in result.logprobs:
                request.output_logprobs.append(result.logprobs[chunk.request_id])
            status = request.check_stop(self.max_model_len)
            if status is not None:
                self.finish_request(request, status)
                finished.append(request)
        return finished

    def _complete_prefix(self, request: Request) -> None:
        """The group's prefix KV is whole: the group takes the blocks, members may start."""
        self.running.remove(request)
        del self.requests[request.request_id]
        request.status = RequestStatus.FINISHED_STOPPED
        self.groups.on_prefix_computed(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """End a request (token stop, stop string found by the caller, or abort); free its KV."""
        assert status.is_finished
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        if request.group_id is not None:
            self.groups.on_finished(request.group_id)
        if request.request_id in self._announced:
            self._announced.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.groups.held_blocks())
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            table = self.kv.block_tables.get(request.request_id, [])
            assert len(table) * self.kv.block_size >= request.num_computed_tokens, request
        for request in self.waiting:
            assert request.request_id not in self.kv.block_tables, f"{request} waits holding KV"
