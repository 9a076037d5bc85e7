"""Tokenizer loading and chat templates without a doubled BOS. Detokenizing (incremental, with
stop strings) is the output processor's (treebatch/output_processor.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

