"""Write OpenAI Batch API output lines, and build the response bodies they carry."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from treebatch.outputs import CompletionOutput, Logprob, RequestOutput

# Token id -> its text, for logprobs (Logprob.decoded_token may be unset).
TokenText = Callable[[int], str]


class WriteFault(OSError):
    """A result file could not be written (disk full, a file-size limit, an I/O error, a vanished
    folder): a fault of the job, not of any request. What was written before it stays; a rerun
    resumes after it."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot write {path}: {cause.strerror or cause}")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class BatchWriter:
    """One JSON object per line, each written whole and flushed at once, so a crash loses at most
    the line being written (a torn last line, which resuming drops). The file is opened on the
    first write: a run without errors leaves no empty error file. `fsync_interval` seconds (None:
    never) bounds what an OS crash, as opposed to a process crash, can lose."""

    def __init__(self, path: str | Path, append: bool = False, fsync_interval: float | None = None) -> None:
        self.path = Path(path)
        self._mode = "a" if append else "w"
        self._file: IO[str] | None = None
        self._fsync_interval = fsync_interval
        self._last_fsync = time.monotonic()
        self.num_responses = 0
        self.num_errors = 0
        self._failed: WriteFault | None = None

    def write_response(self, custom_id: str, body: dict[str, Any], status_code: int = 200) -> None:
        self.write_line(response_line(custom_id, body, status_code), is_error=False)

    def write_error(self, custom_id: str | None, code: str, message: str, retryable: bool = False) -> None:
        self.write_line(error_line(custom_id, code, message, retryable), is_error=True)

    def write_line(self, line: str, is_error: bool) -> None:
        """Write one serialized record (ending in a newline)."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._file is None:
                self._file = open(self.path, self._mode, encoding="utf-8")
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._failed = WriteFault(self.path, exc)
            raise self._failed from exc
        if is_error:
            self.num_errors += 1
        else:
            self.num_responses += 1
        if self._fsync_interval is not None and time.monotonic() - self._last_fsync >= self._fsync_interval:
            self._sync()

    def close(self) -> None:
        """Flush, fsync and close. After a fault the file is closed without its unwritable tail
        (a torn last line, which resuming cuts off), and the fault is not raised again."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            if self._failed is None:
                file.flush()
                if self._fsync_interval is not None:
                    os.fsync(file.fileno())
        except OSError as exc:
            self._failed = WriteFault(self.path, exc)
            raise self._failed from exc
        finally:
            try:
                file.close()
            except OSError:
                pass  # its buffer could not be written: the fault is already raised or recorded

    def __enter__(self) -> "BatchWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _sync(self) -> None:
        assert self._file is not None
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._failed = WriteFault(self.path, exc)
            raise self._failed from exc
        self._last_fsync = time.monotonic()


def response_line(custom_id: str, body: dict[str, Any], status_code: int = 200) -> str:
    """A successful Batch output record, serialized with its newline."""
    record = {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": _new_id(""), "body": body},
        "error": None,
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def error_line(custom_id: str | None, code: str, message: str, retryable: bool = False) -> str:
    """A failed Batch output record (`response: null`), serialized with its newline.

    `retryable`: the error's class. False (final) for invalid input: the line itself is wrong and
    would fail the same way again. True for an engine error on one request (already retried once
    alone in its run): the cause may lie in the run (memory, the machine, a bug since fixed), so
    `treebatch run --retry-failed` runs it again. Faults are never written as records."""
    record = {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "retryable": retryable},
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


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
