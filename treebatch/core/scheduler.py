"""Scheduler: continuous batching under a per-step token budget, over a paged KV cache.

Each step packs the running decodes first, then the running requests' unfinished prefill chunks,
then admits waiting requests (stall-free, as Sarathi-Serve: a long prefill never holds back a
decode, and every token of budget the decodes leave goes to prefill). Admission is bound by free
KV blocks: a request starts only if, after its first chunk, the free blocks still cover half of
the growth the running requests (and it) are expected to need to finish (`_GROWTH_RESERVE`);
`max_num_seqs` is only a safety cap. When a running request cannot get a block for its next
token anyway, the most recently admitted request not yet scheduled in this step is preempted: its
blocks are freed and it goes back to the head of the queue to recompute its prompt and outputs
later (recompute preemption keeps the output exact, since sampled tokens are kept, not redrawn).
"""

from __future__ import annotations

from collections import deque

from treebatch.config import SchedulerConfig
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.outputs import NewRequestData, ScheduledChunk, StepPlan, StepResult
from treebatch.core.request import Request, RequestStatus

# Fraction of the running requests' expected KV growth that admission keeps free. All of it
# (1.0) never preempts when estimates are exact but leaves blocks idle while requests are young
# and holds back requests that stop early; none (0.0) admits until decodes run out of blocks and
# recompute. Half keeps preemptions rare without starving admission.
_GROWTH_RESERVE = 0.5


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        max_model_len: int,
        token_budget: int | None = None,
    ) -> None:
        """`token_budget` replaces `config.max_num_batched_tokens` (the engine passes the measured
        one when the config leaves it None)."""
        self.config = config
        budget = token_budget if token_budget is not None else config.max_num_batched_tokens
        if budget is None or budget <= 0:
            raise ValueError("the scheduler needs a positive token budget")
        self.token_budget: int = budget
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
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()

        # Running requests: decodes first, then unfinished prefill chunks, each in admission order.
        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self._preemption_victim(scheduled)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                scheduled.add(request.request_id)
                budget -= num_new

        # Then admit waiting requests, unless this step already had to preempt. The queue is in
        # plan order (a group's prefix, then its members and child groups); a request whose group
        # is still computing its prefix is stepped over, a bounded number of times per step.
        block_copies: list[tuple[int, int, int]] = []
        if not preempted:
            reserve = sum(self._expected_growth(r) for r in self.running)
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
                num_new = self._admit(request, budget, block_copies, reserve)
                if num_new == 0:
                    break
                del self.waiting[index]
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                reserve += self._expected_growth(request)

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

    def _admit(
        self, request: Request, budget: int, block_copies: list[tuple[int, int, int]], reserve: int
    ) -> int:
        """Give a waiting request KV for its first chunk and return the chunk's size: ask, then
        commit; 0 (refused) changes nothing. `reserve`: expected growth of the running requests."""
        available = self.kv.num_free_blocks - int(_GROWTH_RESERVE * reserve)
        if request.is_prefix and request.num_computed_tokens == 0 and not self.groups.can_admit_prefix(
            request, available
        ):
            return 0
        attaches = request.group_id is not None and request.num_computed_tokens == 0
        copy = None
        if attaches:
            if not self.groups.can_attach(request):
                return 0
            copy = self.groups.attach(request)
        num_new = self._num_new_tokens(request, budget)
        if num_new == 0 or not self._fits_with_growth(request, num_new, reserve) or not self.kv.allocate_slots(
            request, num_new
        ):
            if attaches:  # undo the attach
                self.kv.free(request)
                request.num_computed_tokens = request.num_cached_tokens = 0
            return 0
        if copy is not None:
            block_copies.append(copy)
        return num_new

    def _fits_with_growth(self, request: Request, num_new: int, reserve: int) -> bool:
        """After its first chunk, do the free blocks still cover `_GROWTH_RESERVE` of what the
        running requests and this one are expected to grow by? Always yes when nothing runs, so
        a request that fits the cache at all is never refused forever."""
        if not self.running:
            return True
        held = len(self.kv.block_tables.get(request.request_id, ()))
        after_chunk = num_blocks_for(request.num_computed_tokens + num_new, self.kv.block_size)
        first_chunk = max(0, after_chunk - held)
        growth = max(0, num_blocks_for(request.estimated_num_tokens, self.kv.block_size) - after_chunk)
        return self.kv.num_free_blocks - first_chunk >= _GROWTH_RESERVE * (reserve + growth)

    def _expected_growth(self, request: Request) -> int:
        """KV blocks a running request is expected to add before it finishes."""
        held = len(self.kv.block_tables.get(request.request_id, ()))
        return max(0, num_blocks_for(request.estimated_num_tokens, self.kv.block_size) - held)

    def _preemption_victim(self, scheduled: set[str]) -> Request:
        """The most recently admitted running request that has no chunk in this step yet."""
        for request in reversed(self.running):
            if request.request_id not in scheduled:
                return request
        raise AssertionError("the request asking for KV is running and unscheduled")

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
            enclosing=self.groups.enclosing(request.group_id),
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)  # shared blocks lose one reference; the group keeps them alive
        request.num_computed_tokens = request.num_cached_tokens = 0
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
