"""StepPlan and StepResult: the only types that cross between the scheduler and the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from treebatch.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """Sent once, the first step a request is scheduled: what the sampler must remember."""

    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    seed: int


@dataclass(slots=True)
class ScheduledChunk:
    """One request's work in a step: compute `token_ids` at positions start, start+1, ...

    `block_table` maps each position to a KV block (position // block_size). When `needs_sample`,
    the chunk reaches the request's last token and the runner samples the next one.
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    needs_sample: bool
    num_output_tokens: int  # outputs so far: min_tokens and penalties need it
    # Shared-prefix attention: the group whose prefix this request continues, and how many
    # leading positions lie in the group's shared full blocks (identical for all its members).
    group_id: int | None = None
    num_shared_tokens: int = 0
    # The groups around that one, nearest first, as (group id, shared tokens): their shared blocks
    # begin the table too, so a step with too few queries of one group can read a wider prefix once.
    enclosing: tuple[tuple[int, int], ...] = ()
    num_prompt_tokens: int = 0  # the request's prompt length (a group prefix: the prefix's)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens this chunk runs through the model (recomputed outputs are not)."""
        end = min(self.start_position + len(self.token_ids), self.num_prompt_tokens)
        return max(0, end - self.start_position)

    @property
    def is_single_query(self) -> bool:
        """One query past position 0 attends like a decode, whatever it is part of."""
        return len(self.token_ids) == 1 and self.start_position > 0

    @property
    def is_decode(self) -> bool:
        return self.needs_sample and len(self.token_ids) == 1 and self.num_output_tokens > 0


@dataclass(slots=True)
class StepPlan:
    chunks: list[ScheduledChunk]
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # runner may drop their state
    preempted_request_ids: list[str] = field(default_factory=list)
    # Copy-on-write of a group prefix's partial last block: (source block, target block, tokens),
    # done before the step's forward pass.
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for c in self.chunks if c.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class StepResult:
    """Sampled token per request that needed one; optional per-token logprobs (opaque here)."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, Any] = field(default_factory=dict)
    # Structured outputs: tokens the grammar forces after the sampled one (appended as if
    # sampled, computed next step as one chunk), and the requests whose grammar is complete.
    forced_token_ids: dict[str, list[int]] = field(default_factory=dict)
    grammar_done: set[str] = field(default_factory=set)
