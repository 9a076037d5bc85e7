"""The rules on a prompt that both doors share: the Python API (`LLM.generate`) and the batch-file
path (`treebatch.batch.prompts`). Each rule lives here once; each door keeps its own error type.
"""

from __future__ import annotations

from collections.abc import Sequence


class ContextLengthError(ValueError):
    """A prompt (with its max_tokens) that does not fit the model's context."""

    code = "context_length_exceeded"


class TokenIdError(ValueError):
    """A prompt token id outside the vocabulary."""

    code = "invalid_request"


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """Every prompt token id must lie in [0, vocab_size)."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        raise TokenIdError(f"token ids must lie in [0, {vocab_size}), the model's vocabulary")


def fit_max_tokens(num_prompt_tokens: int, max_model_len: int, max_tokens: int | None, strict: bool = False) -> int:
    """max_tokens for a prompt of `num_prompt_tokens` in a context of `max_model_len`: None means
    all the room left; more than the room is shortened to it, or an error when `strict` (a user
    asked for exactly that many). A prompt that leaves no room for one token is an error."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthError(f"prompt has {num_prompt_tokens} tokens; the model's context is {max_model_len}")
    if max_tokens is None:
        return room
    if max_tokens > room and strict:
        raise ContextLengthError(
            f"max_tokens ({max_tokens}) plus the prompt ({num_prompt_tokens} tokens) exceeds "
            f"the model's context of {max_model_len}"
        )
    return min(max_tokens, room)
