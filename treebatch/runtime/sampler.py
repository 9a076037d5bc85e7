"""Sampler: turns the logits of a step into one token per sampling request, all in one place.

Order of work, per row: penalties (repetition, presence, frequency), the min_tokens ban on stop
tokens, then greedy argmax or temperature -> top-k -> top-p -> min-p -> a draw. Each request owns
a torch.Generator seeded from its seed, and draws exactly one exponential vector per token, so a
seeded request yields the same tokens whatever else shares its batch. Logprobs are the model's raw
log-softmax (before penalties and temperature), as users of the OpenAI API expect.

Structured outputs: a constrained request's state holds its own llguidance matcher
(runtime/guidance.py). Its row's logits are masked to the tokens the grammar admits, after the
penalties and bans and before any sampling rule; then the matcher consumes the drawn token and,
with jump-forward on (and no logprobs asked for), the tokens the grammar now forces, which go
back to the scheduler to be appended and computed as one chunk instead of a decode step each.
A matcher whose grammar is complete ends its request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from treebatch.core.outputs import NewRequestData
from treebatch.layers.native import argmax_rows
from treebatch.sampling_params import SamplingParams

# One generated token's logprobs: {token_id: (logprob, rank)} for the top-k and the chosen token.
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass(slots=True)
class _SamplingState:
    params: SamplingParams
    generator: torch.Generator
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    matcher: Any = None  # an llguidance matcher, for a constrained request


@dataclass(slots=True)
class SampleResult:
    tokens: list[int]
    logprobs: dict[str, TokenLogprobs]
    forced: dict[str, list[int]] = field(default_factory=dict)  # tokens the grammar forces next
    grammar_done: set[str] = field(default_factory=set)  # complete answers


class Sampler:
    def __init__(
        self, vocab_size: int, eos_token_ids: tuple[int, ...], guide: Callable[[], Any] | None = None,
        jump_forward: bool = True,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._states: dict[str, _SamplingState] = {}
        self._make_guide = guide  # made on the first constrained request
        self._guide: Any = None
        self.jump_forward = jump_forward

    def add_request(self, new: NewRequestData) -> None:
        generator = torch.Generator().manual_seed(new.seed)
        state = _SamplingState(new.sampling_params, generator, new.prompt_token_ids)
        constraint = new.sampling_params.structured_outputs
        if constraint is not None:
            state.matcher = self.guide.matcher(constraint.llguidance_grammar)
        self._states[new.request_id] = state

    @property
    def guide(self) -> Any:
        if self._guide is None:
            assert self._make_guide is not None, "structured outputs need the engine's tokenizer"
            self._guide = self._make_guide()
        return self._guide

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str]) -> SampleResult:
        """logits: [N, V] float32, one row per request id. Returns tokens and requested logprobs
        (and, for constrained requests, forced tokens and complete answers)."""
        states = [self._states[rid] for rid in request_ids]
        raw = logits
        logits = self._apply_penalties_and_bans(logits, states)
        guided = [i for i, s in enumerate(states) if s.matcher is not None]
        if guided:
            logits = self._apply_grammars(logits, raw, [states[i].matcher for i in guided], guided)

        tokens = torch.empty(len(states), dtype=torch.long)
        greedy_rows = [i for i, s in enumerate(states) if s.params.is_greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if len(greedy_rows) == len(states):  # all greedy: no copy of the rows
            tokens = argmax_rows(logits)
        elif greedy_rows:
            index = torch.tensor(greedy_rows)
            tokens[index] = logits[index].argmax(dim=-1)
        if random_rows:
            index = torch.tensor(random_rows)
            probs = self._filtered_probs(logits[index], [states[i].params for i in random_rows])
            tokens[index] = self._draw(probs, [states[i].generator for i in random_rows])

        token_list = tokens.tolist()
        for state, token in zip(states, token_list):
            state.output_token_ids.append(token)
        result = SampleResult(token_list, self._logprobs(raw, states, request_ids, token_list))
        for i in guided:
            self._advance(states[i], request_ids[i], token_list[i], result)
        return result

    def _apply_grammars(self, logits: torch.Tensor, raw: torch.Tensor, matchers: list[Any], rows: list[int]) -> torch.Tensor:
        """Mask the constrained rows to what their grammars admit. A row the min_tokens ban has
        emptied (the grammar admits only its end) is masked from the raw logits instead."""
        allowed = self.guide.allowed(matchers)
        if logits is raw:
            logits = logits.clone()
        index = torch.tensor(rows)
        masked = logits[index].masked_fill_(~allowed, float("-inf"))
        empty = torch.isneginf(masked).all(dim=-1)
        if bool(empty.any()):
            masked[empty] = raw[index][empty].masked_fill(~allowed[empty], float("-inf"))
        logits[index] = masked
        return logits

    def _advance(self, state: _SamplingState, request_id: str, token: int, result: SampleResult) -> None:
        matcher = state.matcher
        matcher.consume_token(token)
        if self.jump_forward and state.params.logprobs is None and not matcher.is_stopped():
            forced = matcher.compute_ff_tokens()
            if forced:
                matcher.consume_tokens(forced)
                state.output_token_ids.extend(forced)
                result.forced[request_id] = forced
        if matcher.is_stopped():
            result.grammar_done.add(request_id)

    @staticmethod
    def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One token per row of `probs` [N, V], by inverse transform: the first token whose
        cumulative probability reaches u * total, with u in (0, 1] drawn from the row's own
        generator, so a seeded request draws the same tokens alone or in any batch. One random
        number per row and one batched cumulative sum (in float64, so that no token's share is
        lost to rounding over a large vocabulary). Drawing a vocabulary of exponentials per row
        instead made sampling 64 rows of a 49k vocabulary take 78 ms on 2 cores, against 8.4 ms
        now (measured)."""
        u = torch.cat([1.0 - torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        cumulative = probs.to(torch.float64).cumsum_(dim=-1)
        targets = (u * cumulative[:, -1]).unsqueeze(1)
        # The leftmost index whose cumulative sum reaches the target has a positive probability.
        drawn = torch.searchsorted(cumulative, targets).squeeze(1)
        return drawn.clamp_(max=probs.shape[1] - 1)

    def _apply_penalties_and_bans(self, logits: torch.Tensor, states: list[_SamplingState]) -> torch.Tensor:
        needs_copy = any(s.params.has_penalties or len(s.output_token_ids) < s.params.min_tokens for s in states)
        if not needs_copy:
            return logits
        logits = logits.clone()
        for row, state in enumerate(states):
            params = state.params
            if params.has_penalties:
                self._penalize(logits[row], state)
            if len(state.output_token_ids) < params.min_tokens:
                banned = list(self.eos_token_ids if not params.ignore_eos else ()) + params.stop_token_ids
                banned = [t for t in banned if t < self.vocab_size]  # ids past the vocabulary never come
                if banned:
                    logits[row, torch.tensor(banned)] = float("-inf")
        return logits

    def _penalize(self, row: torch.Tensor, state: _SamplingState) -> None:
        params = state.params
        outputs = torch.tensor(state.output_token_ids, dtype=torch.long)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(state.prompt_token_ids + state.output_token_ids, dtype=torch.long).unique()
            values = row[seen]
            penalty = params.repetition_penalty
            row[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if outputs.numel() and (params.frequency_penalty or params.presence_penalty):
            counts = torch.bincount(outputs, minlength=self.vocab_size)[: self.vocab_size].to(row.dtype)
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
        logits = logits / temperatures
        needs_top_k = any(p.top_k > 0 for p in params)
        needs_top_p = any(p.top_p < 1.0 for p in params)
        if needs_top_k or needs_top_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            if needs_top_k:
                vocab = logits.shape[-1]
                k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]).unsqueeze(1)
                ranks = torch.arange(vocab).unsqueeze(0)
                sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
            if needs_top_p:
                top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype).unsqueeze(1)
                sorted_probs = sorted_logits.softmax(dim=-1)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                # The most likely token always stays, whatever top_p says.
                sorted_logits = sorted_logits.masked_fill(mass_before > top_p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype).unsqueeze(1)
            floor = probs.max(dim=-1, keepdim=True).values * min_p
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, states: list[_SamplingState], request_ids: list[str], tokens: list[int]
    ) -> dict[str, TokenLogprobs]:
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return {}
        index = torch.tensor(rows)
        logprobs = raw[index].float().log_softmax(dim=-1)
        result: dict[str, TokenLogprobs] = {}
        for j, row in enumerate(rows):
            k = states[row].params.logprobs or 0
            entry: TokenLogprobs = {}
            if k:
                values, ids = logprobs[j].topk(k)
                for rank, (token_id, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                    entry[token_id] = (value, rank)
            chosen = tokens[row]
            if chosen not in entry:
                value = logprobs[j, chosen]
                rank = int((logprobs[j] > value).sum()) + 1
                entry[chosen] = (float(value), rank)
            result[request_ids[row]] = entry
        return result
