"""Request: one sequence to generate, with the counters the scheduler works from."""

from __future__ import annotations

import enum
from typing import Any

from treebatch.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # KV freed; waits to recompute its prompt and outputs so far
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """A sequence: prompt tokens, then output tokens appended one per decode step.

    `num_computed_tokens` counts tokens whose KV is in the cache (or scheduled to be written this
    step): the scheduler advances it when it plans a step, so the next step starts after it.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "sampling_params",
        "eos_token_ids",
        "max_tokens",
        "estimated_output_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "status",
        "stop_reason",
        "output_logprobs",
        "seed",
        "group_id",
        "prefix_of",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        max_tokens: int | None = None,
        seed: int = 0,
        group_id: int | None = None,
        prefix_of: int | None = None,
    ) -> None:
        assert len(prompt_token_ids) > 0, "a request needs at least one prompt token"
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids = () if sampling_params.ignore_eos else eos_token_ids
        resolved = max_tokens if max_tokens is not None else sampling_params.max_tokens
        assert resolved is not None and resolved >= 1
        self.max_tokens: int = resolved
        # Outputs this request is expected to produce, for ordering and KV admission: exact under
        # ignore_eos, otherwise max_tokens until a warm-up sample says better (core/policies.py).
        self.estimated_output_tokens: int = resolved
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_logprobs: list[Any] = []  # filled only when sampling_params.logprobs is set
        self.seed = seed  # the sampler's generator seed for this sequence
        # The prefix group whose KV this request starts from (None: from scratch).
        self.group_id = group_id
        # Set on the request that computes a group's prefix: it never samples, and hands its
        # blocks to the group when done.
        self.prefix_of = prefix_of

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """Tokens this request may hold in KV at most: its prompt plus every allowed output."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def estimated_num_tokens(self) -> int:
        """Tokens this request is expected to hold in KV when it finishes."""
        expected = max(self.estimated_output_tokens, self.num_output_tokens + 1)
        return min(self.num_prompt_tokens + expected, self.max_num_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefix(self) -> bool:
        return self.prefix_of is not None

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + outputs, without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return list(self.prompt_token_ids[start:stop])
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return list(self.prompt_token_ids[start:]) + self.output_token_ids[: stop - num_prompt]

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Token-level stop after the last appended token; stop strings are checked by the caller."""
        last = self.output_token_ids[-1]
        num_out = len(self.output_token_ids)
        if num_out >= self.sampling_params.min_tokens:
            if last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in self.sampling_params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if num_out >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.value})"
        )
