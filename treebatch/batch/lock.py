"""One job per output file: an exclusive lock on `OUTPUT.lock`, held for the whole run.

Two `treebatch run`s appending to one output would interleave their lines and answer requests
twice; the second is refused instead. The lock is the kernel's (flock), so a killed run releases
it with its process and a stale lock file left behind means nothing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType


class OutputLocked(RuntimeError):
    """Another process holds the output's lock."""


class OutputLock:
    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._holder()
            raise OutputLocked(
                f"another treebatch run{holder} is writing {self.path.name[: -len('.lock')]} (it holds {self.path}); "
                "wait for it to finish, or stop it and run again to resume"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a waiter)
            self._fd = None

    def _holder(self) -> str:
        try:
            pid = self.path.read_text(encoding="ascii").strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""
