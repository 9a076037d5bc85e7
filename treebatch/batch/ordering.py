"""`--ordered`: write results in input order although the engine finishes them in plan order.

The prefix-tree plan runs whole groups together, so a result can finish long before the lines
above it. Results that arrive early wait in memory up to `max_buffered` lines; beyond that they
spill to an unnamed temporary file and are read back when their turn comes, so memory stays
bounded whatever the order. An interrupted ordered run loses what still waits (it is recomputed
on resume): the file itself only ever holds an in-order prefix.
"""

from __future__ import annotations

import tempfile
from typing import IO

from treebatch.batch.writer import BatchWriter


class OrderedWriter:
    """Release line `seq` to `writer` once every smaller seq was released or skipped."""

    def __init__(self, writer: BatchWriter, max_buffered: int = 10_000) -> None:
        self.writer = writer
        self.max_buffered = max_buffered
        self._next = 0
        self._memory: dict[int, str | None] = {}  # None: skipped (its record went elsewhere)
        self._spilled: dict[int, tuple[int, int]] = {}  # seq -> (offset, length) in the spill file
        self._spill: IO[bytes] | None = None
        self.num_spilled = 0

    def put(self, seq: int, line: str) -> None:
        self._store(seq, line)
        self._release()

    def skip(self, seq: int) -> None:
        """`seq` will never come to this file (it became an error record)."""
        self._store(seq, None)
        self._release()

    @property
    def next_seq(self) -> int:
        """The next seq to be written: all below it are out (or skipped)."""
        return self._next

    @property
    def num_waiting(self) -> int:
        return len(self._memory) + len(self._spilled)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _store(self, seq: int, line: str | None) -> None:
        if seq < self._next or seq in self._memory or seq in self._spilled:
            raise ValueError(f"result {seq} was already given")
        if line is None or len(self._memory) < self.max_buffered or seq == self._next:
            self._memory[seq] = line
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="treebatch-ordered-")
        data = line.encode("utf-8")
        offset = self._spill.seek(0, 2)
        self._spill.write(data)
        self._spilled[seq] = (offset, len(data))
        self.num_spilled += 1

    def _release(self) -> None:
        while True:
            if self._next in self._memory:
                line = self._memory.pop(self._next)
            elif self._next in self._spilled:
                assert self._spill is not None
                offset, length = self._spilled.pop(self._next)
                self._spill.seek(offset)
                line = self._spill.read(length).decode("utf-8")
            else:
                return
            if line is not None:
                self.writer.write_line(line, is_error=False)
            self._next += 1
