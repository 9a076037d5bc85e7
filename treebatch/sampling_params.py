"""SamplingParams: how to pick each next token and when to stop, with validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from treebatch.structured_outputs import StructuredOutputsParams

# Counts and token ids beyond this do not fit the int32/int64 tensors they become.
_INDEX_MAX = (1 << 31) - 1
# Below this temperature sampling is greedy (argmax).
_GREEDY_EPSILON = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings, in the shape vLLM users know.

    `seed` makes a request's samples independent of whatever else shares its batch.
    `stop` strings end generation and are not included in the returned text.
    `logprobs=k` returns the top-k log-probabilities (plus the chosen token's) per generated token.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrain the answer to a JSON schema, regex, choice or grammar (treebatch/structured_outputs.py).
    structured_outputs: StructuredOutputsParams | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(message)

        if not isinstance(self.n, int) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0.0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail(f"top_k must be -1, 0 (all) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            fail(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self._stop_list):
            fail("stop must be a non-empty string or a list of non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(1 << 63) <= self.seed < 1 << 64):
            fail(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")
        if self.top_k > _INDEX_MAX:
            fail(f"top_k must be at most {_INDEX_MAX} (any value from the vocabulary size on means all), got {self.top_k}")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _INDEX_MAX for t in self.stop_token_ids):
            fail(f"stop_token_ids must be integers in [0, {_INDEX_MAX}]")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail("structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")
        for name in ("max_tokens", "min_tokens", "logprobs"):
            value = getattr(self, name)
            if value is not None and value > _INDEX_MAX:
                fail(f"{name} must be at most {_INDEX_MAX}, got {value}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
