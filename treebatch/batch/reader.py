"""Stream an OpenAI Batch API input file, validating each line on its own.

A bad line becomes a `LineError` rather than an exception, so one typo in a
100k-line file costs one output record, not the job.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from treebatch.batch.requests import SUPPORTED_URLS, ParsedRequest, RequestError, parse_body

T = TypeVar("T")

_SURROGATE = re.compile("[\ud800-\udfff]")
# Where a decoded line can hold one: a \uD800-\uDFFF escape (or a raw one in a str line).
_MAYBE_SURROGATE = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """A valid input line."""

    line: int  # 1-based
    custom_id: str
    url: str
    request: ParsedRequest


@dataclass(frozen=True, slots=True)
class LineError:
    """An invalid input line; `custom_id` is None when the line did not name one usable."""

    line: int
    custom_id: str | None
    code: str
    message: str  # starts with "line N: "


def without_errors(items: Iterable[T | LineError], on_error: Callable[[LineError], object]) -> list[T]:
    """The items that are not LineErrors, in order; each LineError goes to `on_error`."""
    kept: list[T] = []
    for item in items:
        if isinstance(item, LineError):
            on_error(item)
        else:
            kept.append(item)
    return kept


def read_batch(path: str | Path) -> Iterator[BatchEntry | LineError]:
    """Entries of the file at `path`, in file order, one per non-blank line."""
    with open(path, "rb") as f:
        yield from parse_lines(f)


def windows(
    entries: Iterable[BatchEntry | LineError], size: int
) -> Iterator[list[BatchEntry | LineError]]:
    """File-order slices holding at most `size` valid entries each (errors ride along).

    A window is what the engine plans as one batch: big enough for the prefix tree to find the
    sharing, small enough that its parsed bodies and token ids fit in memory.
    """
    if size < 1:
        raise ValueError("window size must be at least 1")
    window: list[BatchEntry | LineError] = []
    num_valid = 0
    for entry in entries:
        window.append(entry)
        if isinstance(entry, BatchEntry):
            num_valid += 1
            if num_valid == size:
                yield window
                window, num_valid = [], 0
    if window:
        yield window


def count_lines(path: str | Path) -> int:
    """Lines of the file that `read_batch` yields a record for, counted without parsing JSON (for a
    progress total): all but the blank ones, blank as `parse_lines` sees it (after UTF-8 decoding,
    so a line of U+00A0 or U+2028 is blank, and a byte-order mark alone on line 1)."""
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                count += 1  # its record is the "not valid UTF-8" error
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                count += 1
    return count


def parse_lines(lines: Iterable[bytes | str]) -> Iterator[BatchEntry | LineError]:
    """Entries of raw JSONL lines (bytes or str), numbering lines from 1."""
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield LineError(number, None, "invalid_json", f"line {number}: not valid UTF-8 ({exc.reason})")
                continue
        else:
            text = raw
        if number == 1:
            text = text.removeprefix("\ufeff")  # editors on some systems write a byte-order mark
        if not text.strip():
            continue
        yield _parse_line(number, text, seen)


def _parse_line(number: int, text: str, seen: set[str]) -> BatchEntry | LineError:
    def error(message: str, custom_id: str | None = None, code: str = "invalid_request") -> LineError:
        return LineError(number, custom_id, code, f"line {number}: {message}")

    try:
        record = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        return error(f"duplicate key {exc.key!r} in one object (which one is meant is not clear)", code="invalid_json")
    except json.JSONDecodeError as exc:
        return error(f"not valid JSON ({exc.msg} at column {exc.colno})", code="invalid_json")
    except RecursionError:
        return error("JSON nests too deeply", code="invalid_json")
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits())
        return error(f"not valid JSON (a number has more than {sys.get_int_max_str_digits()} digits)", code="invalid_json")
    if not isinstance(record, dict):
        return error(f"must be a JSON object, got {type(record).__name__}", code="invalid_json")

    custom_id = record.get("custom_id")
    if custom_id is None:
        return error("custom_id: required", code="missing_custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return error(f"custom_id: must be a non-empty string, got {custom_id!r}", code="missing_custom_id")
    if (found := _SURROGATE.search(custom_id)) is not None:
        return error(f"custom_id: {_not_unicode(found.group())}", code="missing_custom_id")
    if custom_id in seen:
        return error(f"custom_id: duplicate {custom_id!r}", custom_id, code="duplicate_custom_id")
    # Claimed before the rest is checked: a later line reusing it is a duplicate even if this one fails.
    seen.add(custom_id)
    # A lone surrogate (an unpaired \ud800 escape) is no text: the tokenizer and the output file refuse it.
    if _MAYBE_SURROGATE.search(text) is not None and (where := _lone_surrogate(record)) is not None:
        return error(where, custom_id)

    method = record.get("method")
    if method != "POST":
        return error(f"method: must be 'POST', got {method!r}", custom_id)
    url = record.get("url")
    if url not in SUPPORTED_URLS:
        return error(f"url: must be one of {', '.join(SUPPORTED_URLS)}, got {url!r}", custom_id, code="unsupported_url")
    body = record.get("body")
    if not isinstance(body, dict):
        return error("body: must be a JSON object", custom_id)
    try:
        request = parse_body(url, body)
    except RequestError as exc:
        return error(f"body.{exc.message}", custom_id, code=exc.code)
    return BatchEntry(number, custom_id, url, request)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key.encode("ascii", "backslashreplace").decode()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return record


def _not_unicode(char: str) -> str:
    return f"not valid Unicode (lone surrogate \\u{ord(char):04x})"


def _lone_surrogate(record: dict) -> str | None:
    """'field: not valid Unicode (...)' for the first string (key or value) holding a lone
    surrogate, fields named as in `body.messages[0].content`; None when there is none."""
    stack: list[tuple[str, object]] = [("", record)]
    while stack:  # a loop, not recursion: json has already allowed the nesting depth
        where, value = stack.pop()
        if isinstance(value, str):
            if (found := _SURROGATE.search(value)) is not None:
                return f"{where}: {_not_unicode(found.group())}"
        elif isinstance(value, dict):
            for key in value:
                if (found := _SURROGATE.search(key)) is not None:
                    name = key.encode("ascii", "backslashreplace").decode()
                    return f"{where + ': ' if where else ''}key '{name}': {_not_unicode(found.group())}"
            stack.extend((f"{where}.{key}" if where else key, item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None
