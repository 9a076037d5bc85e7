"""Write OpenAI Batch API output lines, and build the response bodies they carry."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from treebatch.outputs import CompletionOutput, Logprob, RequestOutput

# Token id -> its text, for logprobs (Logprob.decoded_token may be unset).
TokenText = Callable[[int], str]


class BatchWriter:
    """One JSON object per line; every line is flushed so a crash loses nothing written."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self._file: IO[str] = open(path, "a" if append else "w", encoding="utf-8")
        self.num_responses = 0
        self.num_errors = 0

    def write_response(self, custom_id: str, body: dict[str, Any], status_code: int = 200) -> None:
        self._write(
            {
                "id": _new_id("batch_req_"),
                "custom_id": custom_id,
                "response": {"status_code": status_code, "request_id": _new_id(""), "body": body},
                "error": None,
            }
        )
        self.num_responses += 1

    def write_error(self, custom_id: str | None, code: str, message: str) -> None:
        self._write(
            {
                "id": _new_id("batch_req_"),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )
        self.num_errors += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "BatchWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()


def completion_body(output: RequestOutput, model: str, logprobs: int | None, token_text: TokenText) -> dict[str, Any]:
    """A /v1/completions response body (`object: text_completion`)."""
    choices = [
        {
            "index": c.index,
            "text": c.text,
            "logprobs": None if logprobs is None else _completion_logprobs(c, token_text),
            "finish_reason": c.finish_reason,
        }
        for c in output.outputs
    ]
    return _body("cmpl-", "text_completion", model, choices, output)


def chat_body(output: RequestOutput, model: str, top_logprobs: int | None, token_text: TokenText) -> dict[str, Any]:
    """A /v1/chat/completions response body (`object: chat.completion`)."""
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None if top_logprobs is None else {"content": _chat_logprobs(c, top_logprobs, token_text)},
            "finish_reason": c.finish_reason,
        }
        for c in output.outputs
    ]
    return _body("chatcmpl-", "chat.completion", model, choices, output)


def _body(prefix: str, kind: str, model: str, choices: list[dict[str, Any]], output: RequestOutput) -> dict[str, Any]:
    prompt_tokens = len(output.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return {
        "id": _new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens},
        },
    }


def _completion_logprobs(choice: CompletionOutput, token_text: TokenText) -> dict[str, Any]:
    # The legacy shape: parallel lists; `top_logprobs` maps token text -> logprob and,
    # as in OpenAI's, holds the sampled token too. Offsets count from the completion's start.
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = 0
    for token_id, position in _positions(choice):
        text = _text(token_id, position.get(token_id), token_text)
        tokens.append(text)
        chosen = position.get(token_id)
        token_logprobs.append(None if chosen is None else chosen.logprob)
        alternatives: dict[str, float] = {}
        for alt_id, alt in sorted(position.items(), key=lambda item: item[1].rank):
            alternatives.setdefault(_text(alt_id, alt, token_text), alt.logprob)
        top_logprobs.append(alternatives)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def _chat_logprobs(choice: CompletionOutput, top: int, token_text: TokenText) -> list[dict[str, Any]]:
    content = []
    for token_id, position in _positions(choice):
        chosen = position.get(token_id)
        ranked = sorted((item for item in position.items() if item[1].rank <= top), key=lambda item: item[1].rank)
        content.append(
            {
                **_token_entry(token_id, chosen, token_text),
                "top_logprobs": [_token_entry(alt_id, alt, token_text) for alt_id, alt in ranked[:top]],
            }
        )
    return content


def _token_entry(token_id: int, logprob: Logprob | None, token_text: TokenText) -> dict[str, Any]:
    text = _text(token_id, logprob, token_text)
    return {
        "token": text,
        # OpenAI's sentinel for "not computed"; the engine returns the chosen token's, so rare.
        "logprob": -9999.0 if logprob is None else logprob.logprob,
        "bytes": list(text.encode("utf-8")),
    }


def _positions(choice: CompletionOutput) -> list[tuple[int, dict[int, Logprob]]]:
    return list(zip(choice.token_ids, choice.logprobs or []))


def _text(token_id: int, logprob: Logprob | None, token_text: TokenText) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return token_text(token_id)


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex
