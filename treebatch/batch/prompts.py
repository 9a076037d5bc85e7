"""Tokenize a window of parsed requests: chat templates, batched encoding, context checks.

Used by both `treebatch run` (with the loaded engine's tokenizer) and `treebatch plan` (with the
tokenizer alone), so the plan sees exactly the token ids the run will compute. Texts are encoded a
chunk at a time through the tokenizer's batch call: one Rust call per chunk instead of one Python
call per line is what makes planning a 100k-line file take seconds.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

from treebatch.batch.reader import BatchEntry, LineError
from treebatch.batch.requests import RequestError, fit_context
from treebatch.inputs import TokenIdError, check_token_ids
from treebatch.sampling_params import SamplingParams
from treebatch.tokenizer import has_chat_template, render_chat

_ENCODE_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready for the engine: its prompt as compact token ids and its final params."""

    entry: BatchEntry
    token_ids: array  # array('i'): 4 bytes a token, not a Python int object each
    params: SamplingParams

    @property
    def engine_prompt(self) -> dict[str, Any]:
        return {"prompt_token_ids": self.token_ids.tolist()}


class PromptTokenizer:
    """What tokenizing a batch needs: a Hugging Face-style tokenizer and the context length.

    The tokenizer must be callable on a list of texts (`tokenizer(texts, add_special_tokens=...)`
    returning `input_ids`) and render chat templates (`apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True, **chat_template_kwargs)`). `model_name` names the model in errors.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, model_name: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = model_name
        try:
            self.vocab_size: int | None = len(tokenizer)
        except TypeError:
            self.vocab_size = None

    @classmethod
    def of(cls, llm: Any) -> PromptTokenizer:
        """From anything with `tokenizer` and `max_model_len` (an LLM, or the tokenizer-only load)."""
        return cls(llm.tokenizer, llm.max_model_len, getattr(llm, "model_name", None))

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start : start + _ENCODE_CHUNK]
            out.extend(self.tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
        return out

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def render_chats(
        self,
        conversations: list[list[dict[str, str]]],
        template_kwargs: list[dict[str, Any] | None] | None = None,
    ) -> list[str | Exception]:
        """Each conversation as text (later encoded without special tokens: the template writes
        BOS itself, the rule of treebatch.tokenizer.chat_token_ids), or the template's error.

        `template_kwargs[i]` holds conversation i's extra template variables (None: none).
        Conversations with equal kwargs render together in one batched call: the template's
        per-call setup is a good part of its cost, and a call takes one set of kwargs."""
        if template_kwargs is None:
            template_kwargs = [None] * len(conversations)
        batches: dict[str, list[int]] = {}
        for i, kwargs in enumerate(template_kwargs):
            batches.setdefault(_kwargs_key(kwargs), []).append(i)
        out: list[str | Exception] = [""] * len(conversations)
        for members in batches.values():
            kwargs = template_kwargs[members[0]]
            for i, text in zip(members, self._render_batch([conversations[i] for i in members], kwargs)):
                out[i] = text
        return out

    def _render_batch(self, conversations: list[list[dict[str, str]]], kwargs: dict[str, Any] | None) -> list[str | Exception]:
        try:  # one batched call
            return list(render_chat(self.tokenizer, conversations, True, kwargs))
        except Exception:
            pass  # some conversation is bad: render one by one to pin it down
        out: list[str | Exception] = []
        for messages in conversations:
            try:
                out.append(render_chat(self.tokenizer, messages, True, kwargs))
            except Exception as exc:  # template errors (e.g. role order) belong to that line only
                out.append(exc)
        return out


def _kwargs_key(kwargs: dict[str, Any] | None) -> str:
    """One key per distinct set of template variables (validated JSON values, so they dump)."""
    return json.dumps(kwargs, sort_keys=True) if kwargs else ""


def prepare_window(entries: list[BatchEntry], tokenizer: PromptTokenizer) -> list[PreparedRequest | LineError]:
    """One result per entry, in order: the prepared request, or the line's error."""
    results: list[PreparedRequest | LineError | None] = [None] * len(entries)
    ids: list[Any] = [None] * len(entries)
    plain: list[int] = []  # completions with a text prompt: encoded with special tokens (BOS)
    chat_lines: list[int] = []
    for i, entry in enumerate(entries):
        request = entry.request
        if request.messages is not None:
            chat_lines.append(i)
        elif isinstance(request.prompt, str):
            plain.append(i)
        else:
            ids[i] = request.prompt
    chats: list[int] = []
    chat_texts: list[str] = []
    if chat_lines and not tokenizer.has_chat_template:  # a base model: never a guessed template
        reason = RequestError(
            f"model {tokenizer.model_name or 'in use'} has no chat template; use /v1/completions",
            code="no_chat_template",
        )
        for i in chat_lines:
            results[i] = _error(entries[i], reason)
        chat_lines = []
    rendered = tokenizer.render_chats(
        [entries[i].request.messages for i in chat_lines],
        [entries[i].request.chat_template_kwargs for i in chat_lines],
    )
    for i, text in zip(chat_lines, rendered):
        if isinstance(text, Exception):
            results[i] = _error(entries[i], RequestError(f"messages: chat template failed: {text}"))
        else:
            chats.append(i)
            chat_texts.append(text)
    for i, tokens in zip(plain, tokenizer.encode([entries[i].request.prompt for i in plain], True)):
        ids[i] = tokens
    for i, tokens in zip(chats, tokenizer.encode(chat_texts, False)):
        ids[i] = tokens

    vocab = tokenizer.vocab_size
    for i, entry in enumerate(entries):
        if results[i] is not None:
            continue
        tokens = ids[i]
        try:
            if vocab is not None and isinstance(entry.request.prompt, list):
                check_token_ids(tokens, vocab)
            params = fit_context(entry.request, len(tokens), tokenizer.max_model_len)
        except TokenIdError as exc:
            results[i] = _error(entry, RequestError(f"prompt: {exc}", code=exc.code))
            continue
        except RequestError as exc:
            results[i] = _error(entry, exc)
            continue
        results[i] = PreparedRequest(entry, array("i", tokens), params)
    return results  # type: ignore[return-value]  # every slot is filled above


def _error(entry: BatchEntry, exc: RequestError) -> LineError:
    return LineError(entry.line, entry.custom_id, exc.code, f"line {entry.line}: {exc.message}")
