"""Tokenizer loading and chat templates without a doubled BOS. Detokenizing (incremental, with
stop strings) is the output processor's (treebatch/output_processor.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from treebatch.models.checks import ModelLoadError

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer ({' or '.join(_TOKENIZER_FILES)}); pass --tokenizer FOLDER")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: the tokenizer does not load ({exc})") from exc
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


class NoChatTemplateError(ValueError):
    """A chat request to a model whose tokenizer has no chat template (a base model)."""


# apply_chat_template's own arguments and the template variables it sets itself: a template
# kwarg of one of these names would clash with what treebatch passes (or silently replace it).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "conversations", "messages", "tools", "documents", "chat_template",
        "add_generation_prompt", "continue_final_message", "tokenize", "sanitize_control_tokens",
        "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)
_JSON_SCALARS = (str, int, float, bool, type(None))


def check_chat_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """`chat_template_kwargs` (e.g. Qwen3's `{"enable_thinking": False}`) as a plain dict: an
    object whose keys are strings and whose values are JSON values, none of them a name that
    apply_chat_template sets itself. Raises ValueError naming the offending key."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"must be an object (a dict of template variables), got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"keys must be non-empty strings, got {key!r}")
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"{key}: set by treebatch itself, not a template variable")
        if not _is_json_value(value):
            raise ValueError(f"{key}: must be a JSON value (string, number, boolean, null, list or object)")
    return dict(kwargs)


def _is_json_value(value: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, _JSON_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v, depth + 1) for k, v in value.items())
    return False


_NOT_AN_ATTRIBUTE = object()


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render chats. An object without a `chat_template` attribute is
    not a transformers tokenizer and renders by its own rules; None or "" means no template
    (a base model), for which transformers would raise or a caller might guess one."""
    template = getattr(tokenizer, "chat_template", _NOT_AN_ATTRIBUTE)
    return template is _NOT_AN_ATTRIBUTE or bool(template)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """The chat template rendered to text (a list of texts for a list of conversations), with
    `chat_template_kwargs` as extra template variables."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
    )


def chat_token_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
) -> list[int]:
    """Render the chat template to text, then tokenize without adding special tokens: the
    template already writes BOS where the model wants one, so adding it again would double it.

    A tokenizer without a chat template raises NoChatTemplateError (never a guessed template);
    `chat_template_kwargs` are checked by `check_chat_template_kwargs` (ValueError)."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError(
            f"model {model_name or 'in use'} has no chat template (a base model?); "
            "use LLM.generate with a plain-text prompt (/v1/completions in batch files)"
        )
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    text = render_chat(tokenizer, messages, add_generation_prompt, kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids
