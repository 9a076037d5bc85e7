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

On a model whose every layer has a sliding window (the KV manager's `window`), each step first
gives back the running requests' blocks that fell out of the window (core/kv_manager.py), so a
long generation holds a window's worth of KV, and admission counts what a request holds and
will hold at most under the window, not its whole length.

`add_plan` is the only door for a planned batch (core/plan.py): it registers the plan's groups,
makes each group's prefix request and gives members their group. The rules themselves (chunk
size, growth reserve, group admission) are the pure functions of core/rules.py, which the cost
model replays through this same scheduler.
"""

from __future__ import annotations

from collections import deque

from treebatch.config import SchedulerConfig
from treebatch.core.groups import GroupManager
from treebatch.core.kv_manager import KVCacheManager, num_blocks_for
from treebatch.core.outputs import NewRequestData, ScheduledChunk, StepPlan, StepResult
from treebatch.core.plan import BatchPlan, EntryKind
from treebatch.core.request import Request, RequestStatus
from treebatch.core.rules import chunk_size, expected_growth, fits_with_growth, growth_reserve, prefix_fits
from treebatch.sampling_params import SamplingParams

_PREFIX_PARAMS = SamplingParams(max_tokens=1)  # never sampled: a prefix request only fills KV


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        """`config.max_num_batched_tokens` must be resolved (the engine puts the measured budget
        there when the user left it to the machine)."""
        if config.max_num_batched_tokens is None:
            raise ValueError("the scheduler needs a resolved token budget (max_num_batched_tokens)")
        self.config = config
        self.token_budget: int = config.max_num_batched_tokens
        self.kv = kv_manager
        self.groups = GroupManager(kv_manager)
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._announced: set[str] = set()  # requests whose NewRequestData the runner has had
        self._finished_ids: list[str] = []  # finished since the last plan
        self._prefix_requests: dict[int, Request] = {}  # group -> the request computing its prefix
        self.num_preemptions = 0
        self.num_unpinned_prefixes = 0  # group prefixes given back to make room, computed again

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
        chunk = min(self.token_budget, longest) if self.config.enable_chunked_prefill else longest
        if not self.kv.fits_at_all(longest, chunk):
            raise ValueError(
                f"request {request.request_id!r} needs KV for {longest} tokens, more than the whole "
                f"cache holds ({self.kv.pool.num_blocks} blocks of {self.kv.block_size}); "
                "raise kv_cache_memory or lower max_tokens"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_plan(self, plan: BatchPlan, sequences: list[Request]) -> list[Request]:
        """Queue a planned batch (`sequences[i]` is the plan's sequence i): register its groups,
        make each group's prefix request, give members their group. Returns the requests in
        queue order, prefix requests included. Group ids stay unique across batches."""
        assert len(sequences) == plan.num_sequences
        base = self.groups.num_groups
        queued = []
        for entry in plan.queue:
            parent = None if entry.group is None else base + entry.group
            if entry.kind is EntryKind.PREFIX:
                spec = plan.groups[entry.index]
                group_id = base + spec.group_id
                self.groups.add_group(group_id, parent, spec.prefix_end, spec.num_pending, spec.estimated_blocks)
                tokens = sequences[spec.source].prompt_token_ids[: spec.prefix_end]
                request = Request(f"prefix-{group_id}", tokens, _PREFIX_PARAMS, group_id=parent, prefix_of=group_id)
                self._prefix_requests[group_id] = request  # kept until the group is released
            else:
                request = sequences[entry.index]
                request.group_id = parent
            self.add_request(request)
            queued.append(request)
        return queued

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()
        if self.kv.window is not None:
            for request in self.running:
                self.kv.free_out_of_window(request, self._num_protected(request))

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
                if victim is request and len(self.running) == 1 and self._unpin_for(request):
                    continue  # alone, it would only be admitted again: pinned prefixes give way
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                scheduled.add(request.request_id)
                budget -= num_new

        # Then admit waiting requests, unless this step already had to preempt (and has work).
        # When nothing runs and nothing can start, group prefixes pinned elsewhere hold the
        # blocks the first waiting request needs: give them back one at a time (their prefixes
        # are computed again later).
        block_copies: list[tuple[int, int, int]] = []
        if not preempted or not chunks:
            refused = self._admit_waiting(budget, chunks, block_copies)
            while not chunks and not self.running and refused is not None and self._unpin_for(refused):
                refused = self._admit_waiting(budget, chunks, block_copies)

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

    def _admit_waiting(
        self, budget: int, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int, int]]
    ) -> Request | None:
        """Admit waiting requests in queue order while the budget, the KV and `max_num_seqs`
        allow. The queue is in plan order (a group's prefix, then its members and child groups);
        a request whose group is still computing its prefix is stepped over, a bounded number of
        times per step. Returns the first request refused for its KV, if any."""
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
                return request
            del self.waiting[index]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, num_new))
            budget -= num_new
            reserve += self._expected_growth(request)
        return None

    def _unpin_for(self, request: Request) -> bool:
        """Nothing else runs and `request` (the first waiting request that could start, or the one
        running request) does not fit: give back the KV of the most recently readied group prefix
        that no other pinned group builds on, that `request` does not start from, and whose waiting dependents all come
        after `request` in the queue (so two groups never take turns evicting each other). Its
        prefix request waits again right before its first dependent. False when there is none
        (the cache is too small for the batch's nesting)."""
        head = next((i for i, w in enumerate(self.waiting) if w is request), -1)  # -1: it runs
        first_dependent: dict[int, int] = {}
        for index, waiting in enumerate(self.waiting):
            for group_id in self.groups.chain(waiting.group_id):
                first_dependent.setdefault(group_id, index)
        needed = set(self.groups.chain(request.group_id))
        for group_id in self.groups.unpin_candidates():
            position = first_dependent.get(group_id, len(self.waiting))
            if group_id not in needed and position > head:
                break
        else:
            return False
        self.groups.unpin(group_id)
        self.num_unpinned_prefixes += 1
        prefix = self._prefix_requests[group_id]
        prefix.num_computed_tokens = prefix.num_cached_tokens = 0
        prefix.status = RequestStatus.WAITING
        self.requests[prefix.request_id] = prefix
        self.waiting.insert(position, prefix)
        return True

    def _admit(
        self, request: Request, budget: int, block_copies: list[tuple[int, int, int]], reserve: int
    ) -> int:
        """Give a waiting request KV for its first chunk and return the chunk's size. Ask, then
        commit: every check (the group's admission, the copy of a partial prefix block, the first
        chunk and the growth reserve) is made before anything changes; 0 (refused) changes
        nothing. `reserve`: expected growth of the running requests."""
        block_size = self.kv.block_size
        starts_fresh = request.num_computed_tokens == 0
        if request.is_prefix and starts_fresh:
            available = self.kv.num_free_blocks - growth_reserve(reserve)
            estimated = self.groups.groups[request.prefix_of].estimated_blocks
            if not prefix_fits(estimated, self.kv.pool.num_blocks, available, bool(self.running)):
                return 0
        attaches = request.group_id is not None and starts_fresh
        if attaches:
            start, held, copied = self.groups.attach_counts(request.group_id)
        else:
            start, held, copied = request.num_computed_tokens, len(self.kv.block_tables.get(request.request_id, ())), 0
        num_new = chunk_size(request.num_tokens - start, budget, self.config.enable_chunked_prefill)
        if num_new == 0:
            return 0
        after_chunk = num_blocks_for(start + num_new, block_size)
        first_chunk = copied + max(0, after_chunk - held)
        own_growth = max(0, self.kv.peak_blocks(request.estimated_num_tokens) - after_chunk)
        if not self.kv.pool.can_allocate(first_chunk) or not fits_with_growth(
            self.kv.num_free_blocks, first_chunk, reserve, own_growth, bool(self.running)
        ):
            return 0
        if attaches:
            copy = self.groups.attach(request)
            if copy is not None:
                block_copies.append(copy)
        allocated = self.kv.allocate_slots(request, num_new)
        assert allocated, "admission was checked before committing"
        return num_new

    def _expected_growth(self, request: Request) -> int:
        """KV blocks a running request is expected to add before it finishes."""
        return expected_growth(self.kv.peak_blocks(request.estimated_num_tokens), self.kv.num_live_blocks(request))

    def _num_protected(self, request: Request) -> int:
        """Entries the request's table begins with that are its group's to free, not its own."""
        return self.groups.num_shared_tokens(request.group_id) // self.kv.block_size

    def _preemption_victim(self, scheduled: set[str]) -> Request:
        """The most recently admitted running request that has no chunk in this step yet."""
        for request in reversed(self.running):
            if request.request_id not in scheduled:
                return request
        raise AssertionError("the request asking for KV is running and unscheduled")

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        return chunk_size(request.num_tokens_to_compute, budget, self.config.enable_chunked_prefill)

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
            num_prompt_tokens=request.num_prompt_tokens,
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
        """Append sampled tokens (and the tokens a grammar forces after them), apply token-level
        stops after each; return the requests that finished. Forced tokens are outputs not yet
        computed: the request's next chunk computes them with its next sample's position."""
        finished: list[Request] = []
        for chunk in plan.chunks:
            request_id = chunk.request_id
            request = self.requests[request_id]
            if request.is_prefix and request.num_computed_tokens == request.num_tokens:
                self._complete_prefix(request)
            if not chunk.needs_sample:
                continue
            if request_id in result.logprobs:
                request.output_logprobs.append(result.logprobs[request_id])
            status = None
            for token in [result.sampled_token_ids[request_id], *result.forced_token_ids.get(request_id, ())]:
                request.append_output_token(token)
                status = request.check_stop(self.max_model_len)
                if status is not None:
                    break
            if status is None and request_id in result.grammar_done:
                status = RequestStatus.FINISHED_STOPPED  # the answer is complete
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
        assert status.is_finished and not request.is_prefix
        if request.is_finished:
            return
        self._remove(request, status)
        if request.group_id is not None:
            for group_id in self.groups.on_finished(request.group_id):
                del self._prefix_requests[group_id]
        if request.request_id in self._announced:
            self._announced.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    def abort(self, request_ids: list[str]) -> list[Request]:
        """End unfinished requests (an abandoned iterator, an interrupted window) without running
        them: their KV is freed and their groups are released bottom-up; the prefix request of a
        group that nobody needs any more is dropped, computed or not. Returns every request removed."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.is_prefix:
                self.finish_request(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        orphans = [r for r in self.requests.values() if r.is_prefix and r.prefix_of not in self._prefix_requests]
        for request in orphans:
            self._remove(request, RequestStatus.FINISHED_ABORTED)
        return aborted + orphans

    def _remove(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.groups.held_blocks())
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            table = self.kv.block_tables.get(request.request_id, [])
            assert len(table) * self.kv.block_size >= request.num_computed_tokens, request
        for request in self.waiting:
            assert request.request_id not in self.kv.block_tables, f"{request} waits holding KV"
