"""Resume an interrupted run: find what the output and error files already answer.

Every record is one whole line, written and flushed at once, so a killed run leaves at most one
torn line, the last; it is cut off here and its request runs again. A line that does not parse
anywhere else means the file is not ours (or was edited), and resuming refuses rather than guess.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from treebatch.batch.reader import BatchEntry, LineError

_LINE_NUMBER = re.compile(r"line (\d+):")


class ResumeError(ValueError):
    """An existing output or error file that cannot be resumed from."""


@dataclass(slots=True)
class FinishedSet:
    """Input lines already answered, by custom_id and, for error records, by line number.

    Error records name their line ("line N: ..."), which is the only key of a line without a
    usable custom_id; a duplicate-id error carries the *first* line's custom_id, so it counts by
    line only, or it would mark the first line's request as done.
    """

    custom_ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    num_responses: int = 0
    num_errors: int = 0
    num_dropped_bytes: int = 0  # a torn last line cut off

    def covers(self, entry: BatchEntry | LineError) -> bool:
        if entry.line in self.lines:
            return True
        return isinstance(entry, BatchEntry) and entry.custom_id in self.custom_ids

    @property
    def num_records(self) -> int:
        return self.num_responses + self.num_errors


def scan_finished(paths: list[Path]) -> FinishedSet:
    """What the files at `paths` (those that exist) already answer; cuts a torn last line."""
    finished = FinishedSet()
    for path in paths:
        if path.is_file():
            finished.num_dropped_bytes += drop_torn_tail(path)
            _scan(path, finished)
    return finished


def drop_retryable(path: Path) -> int:
    """Take the retryable error records (engine errors: `error.retryable`, or an `engine_error`
    code in files written before records carried it) out of the error file at `path`, so the
    run that follows answers their requests again; returns how many. The file is rewritten
    beside itself, fsynced, then renamed over the old one: a crash leaves the old or the new."""
    if not path.is_file():
        return 0
    drop_torn_tail(path)
    kept: list[bytes] = []
    dropped = 0
    with open(path, "rb") as f:
        for raw in f:
            if _is_retryable(raw):
                dropped += 1
            else:
                kept.append(raw)
    if dropped:
        staged = path.with_name(path.name + ".retry-tmp")
        with open(staged, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    return dropped


def _is_retryable(raw: bytes) -> bool:
    try:
        record = json.loads(raw)
    except ValueError:
        return False  # not a record: scanning names it
    error = record.get("error") if isinstance(record, dict) else None
    if not isinstance(error, dict):
        return False
    return bool(error.get("retryable", error.get("code") == "engine_error"))


def drop_torn_tail(path: Path) -> int:
    """Truncate an unterminated or unparsable last line; returns the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # Only the last line can be torn; read back far enough to hold it (records are small,
        # but a chat answer with logprobs can be long, so grow the window until a newline shows).
        tail_start = size
        tail = b""
        while tail_start > 0:
            step = min(tail_start, max(1 << 16, len(tail)))
            tail_start -= step
            f.seek(tail_start)
            tail = f.read(size - tail_start)
            if b"\n" in tail[:-1]:
                break
        last_newline = tail.rfind(b"\n", 0, len(tail) - 1)
        last_start = tail_start + last_newline + 1 if last_newline >= 0 else 0
        last = tail[last_start - tail_start :]
        if last.endswith(b"\n") and _parses(last):
            return 0
        f.truncate(last_start)
        f.flush()
        os.fsync(f.fileno())
        return size - last_start


def _parses(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def _scan(path: Path, finished: FinishedSet) -> None:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise ResumeError(f"{path}: line {number} is not a result record ({exc}); use --overwrite") from exc
            if not isinstance(record, dict) or "custom_id" not in record:
                raise ResumeError(f"{path}: line {number} is not a result record; use --overwrite")
            custom_id = record["custom_id"]
            error = record.get("error")
            if error is None:
                finished.num_responses += 1
                if isinstance(custom_id, str):
                    finished.custom_ids.add(custom_id)
                continue
            finished.num_errors += 1
            match = _LINE_NUMBER.match(str(error.get("message", "")))
            if match:
                finished.lines.add(int(match.group(1)))
            if isinstance(custom_id, str) and error.get("code") != "duplicate_custom_id":
                finished.custom_ids.add(custom_id)
