"""Tokenizer loading, chat templates without a doubled BOS, and detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treebatch.core.request import Request


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


@dataclass
class TokenizerOnly:
    """A model's tokenizer and context length without its weights: enough to tokenize and plan
    a batch (`treebatch plan`); has the `tokenizer`, `max_model_len`, `model_name` of an LLM."""

    tokenizer: Any
    max_model_len: int
    model_name: str


def load_tokenizer_only(
    model: str | None = None, tokenizer: str | None = None, max_model_len: int | None = None
) -> TokenizerOnly:
    """The tokenizer `LLM(model, tokenizer=..., max_model_len=...)` would use, loading no weights."""
    from treebatch.models.loader import load_tokenizer_files

    files = load_tokenizer_files(model)
    loaded = load_tokenizer(tokenizer or files.tokenizer_path, files.chat_template)
    context = min(max_model_len or files.context_length, files.context_length)
    return TokenizerOnly(loaded, context, files.name)


def chat_token_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Render the chat template to text, then tokenize without adding special tokens: the
    template already writes BOS where the model wants one, so adding it again would double it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def find_stop_string(self, request: Request) -> bool:
        """True (and `request.stop_reason` set) when the output text now contains a stop string."""
        params = request.sampling_params
        text = self.decode(request.output_token_ids, params.skip_special_tokens)
        hit = _first_stop(text, params.stop_strings)
        if hit is None:
            return False
        request.stop_reason = hit[1]
        return True

    def final_text(self, request: Request) -> str:
        """The output text; cut before the first stop string unless asked to keep it."""
        params = request.sampling_params
        text = self.decode(request.output_token_ids, params.skip_special_tokens)
        hit = _first_stop(text, params.stop_strings)
        if hit is not None:
            index, stop = hit
            text = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
            request.stop_reason = stop
        return text


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
