"""CalibrationTable: what one forward pass costs on this machine, as plain numbers.

`treebatch.runtime.calibration` measures it on the loaded model; the scheduler takes its token
budget from it and the cost model predicts run times from it. It lives in the core (no torch) so
that both can read it.

A step's time is modelled as

    forward_seconds(tokens) + seconds_per_context_pair * single-query pairs
        + seconds_per_chunk_pair * many-query pairs + seconds_per_decode * decodes
        + seconds_per_chunk * prefill chunks:

the first term is everything that grows with the number of tokens in the step (projections, MLP,
logits, overheads), measured on prefill chunks of moderate length; the next two are attention over
keys already in the cache, one pair per (query token, cached key). A decode's pairs cost what
reading its keys from memory costs (a decode over a long context is dearer than one over a short
one); a prefill chunk's queries read their keys together in one matrix product, which costs
arithmetic, several times less per pair on a CPU (core/step_layout.py counts both kinds). The
last two are what a decode, and a prefill chunk, cost beyond as many prompt tokens in one
long chunk (each its own attention call per layer, its mask, its block table): a step of 25
ten-token chunks took 1.4x the time of one 256-token chunk (measured on a few-shot labelling
batch), which the token count alone does not say.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CalibrationTable:
    forward_seconds: dict[int, float]  # tokens in one forward pass -> seconds (prefill chunks)
    seconds_per_context_pair: float  # a single query's attention over cached keys, per key
    token_budget: int  # the step size where tokens/s stops growing
    key: dict[str, Any] = field(default_factory=dict)  # what the measurement is valid for
    is_complete: bool = True  # False: cut short by the time limit (not cached, fallback budget)
    seconds_per_decode: float = 0.0
    seconds_per_chunk_pair: float = 0.0  # a prefill chunk's attention over cached keys, per pair
    seconds_per_chunk: float = 0.0  # a prefill chunk beyond its tokens
    # The machine's pace while this was measured (runtime/machine_cache.py), None where unknown:
    # a later start that finds the machine much faster than that measures again.
    pace: float | None = None

    def __post_init__(self) -> None:
        assert self.forward_seconds and all(t > 0 for t in self.forward_seconds.values())
        assert self.token_budget > 0 and min(self.seconds_per_context_pair, self.seconds_per_chunk_pair) >= 0

    def forward_time(self, num_tokens: int) -> float:
        """Seconds of a forward pass over `num_tokens` tokens: piecewise linear between the
        measured sizes; flat below the smallest (fixed costs dominate), proportional beyond the
        largest (throughput has saturated there)."""
        sizes = sorted(self.forward_seconds)
        if num_tokens <= sizes[0]:
            return self.forward_seconds[sizes[0]]
        if num_tokens >= sizes[-1]:
            return self.forward_seconds[sizes[-1]] * num_tokens / sizes[-1]
        i = bisect.bisect_left(sizes, num_tokens)
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self.forward_seconds[lo], self.forward_seconds[hi]
        return t_lo + (t_hi - t_lo) * (num_tokens - lo) / (hi - lo)

    def step_time(
        self, num_tokens: int, num_context_pairs: int = 0, num_decodes: int = 0, num_chunk_pairs: int = 0,
        num_chunks: int = 0,
    ) -> float:
        """`num_context_pairs`: single-query (decode) pairs; `num_chunk_pairs`: many-query ones;
        `num_chunks`: prefill chunks (of more than one query)."""
        if num_tokens <= 0:
            return 0.0
        return (
            self.forward_time(num_tokens)
            + self.seconds_per_context_pair * num_context_pairs
            + self.seconds_per_chunk_pair * num_chunk_pairs
            + self.seconds_per_decode * num_decodes
            + self.seconds_per_chunk * max(0, num_chunks - 1)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward_seconds": {str(m): t for m, t in sorted(self.forward_seconds.items())},
            "seconds_per_context_pair": self.seconds_per_context_pair,
            "token_budget": self.token_budget,
            "key": self.key,
            "is_complete": self.is_complete,
            "seconds_per_decode": self.seconds_per_decode,
            "seconds_per_chunk_pair": self.seconds_per_chunk_pair,
            "seconds_per_chunk": self.seconds_per_chunk,
            "pace": self.pace,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationTable":
        return cls(
            forward_seconds={int(m): float(t) for m, t in data["forward_seconds"].items()},
            seconds_per_context_pair=float(data["seconds_per_context_pair"]),
            token_budget=int(data["token_budget"]),
            key=dict(data.get("key", {})),
            is_complete=bool(data.get("is_complete", True)),
            seconds_per_decode=float(data.get("seconds_per_decode", 0.0)),
            seconds_per_chunk_pair=float(data.get("seconds_per_chunk_pair", 0.0)),
            seconds_per_chunk=float(data.get("seconds_per_chunk", 0.0)),
            pace=None if data.get("pace") is None else float(data["pace"]),
        )


# The knee of a flat, noisy curve moves between calibrations of the same code (64 one start,
# 128 the next), and budgets of 64-128 cost 10-15% on the shared-prefix suite, while 256-1024
# measured equal within noise: so the budget never goes below this (or the largest size measured).
MIN_TOKEN_BUDGET = 256


def choose_token_budget(
    forward_seconds: dict[int, float], tolerance: float = 0.08, floor: int = MIN_TOKEN_BUDGET
) -> int:
    """The smallest measured step size whose tokens/s is within `tolerance` of the best, but at
    least `floor` (capped at the largest size measured).

    Past that size a bigger step buys almost no throughput but delays every decode riding in it
    and lets fewer requests run at once for the same work, so the knee is the budget."""
    rates = {m: m / t for m, t in forward_seconds.items()}
    best = max(rates.values())
    knee = min(m for m, rate in rates.items() if rate >= (1.0 - tolerance) * best)
    return max(knee, min(floor, max(rates)))
