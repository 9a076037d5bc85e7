"""Measurements of this machine made once and kept: one JSON file per kind and key.

The start-up probes (runtime/precision.py: is bf16 faster here; runtime/kernel_choice.py: where
the packed projection kernel wins) depend on the CPU, its flags, torch's version and thread
count, and their own inputs. `cached` reads `<cache root>/calibration/<kind>-<key hash>.json`
or measures and writes it atomically; a read-only cache only means measuring again.

A measurement taken while something else ran on the machine is slow throughout and, cached,
would steer every later start (a calibration measured beside the test suite cost a benchmark
run 10-25%). So each stored measurement keeps the machine's `pace` as it was taken: the median
time of a fixed float32 matrix product, which another process on the cores makes 2-8x slower
(measured on 2 cores), where an idle machine repeats it within a few percent. A start that finds
the stored pace more than LOADED_FACTOR slower than its own measures again and replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from treebatch.host import cache_root, cpu_model, cpuinfo_field


def machine_key(**inputs: Any) -> dict[str, Any]:
    """What a measurement on this machine depends on, plus the probe's own `inputs`."""
    return {"cpu": cpu_model(), "flags": cpuinfo_field("flags", "Features") or "", "torch": torch.__version__,
            "threads": torch.get_num_threads(), **inputs}


# A stored measurement whose pace was this much slower than the machine's now was taken under load.
LOADED_FACTOR = 1.3
# The pace measured in this process, reused for this long (a start asks several times).
_PACE_REUSE_S = 30.0
_pace_now: list[float] = []  # [seconds, when measured]


def pace(repeats: int = 5) -> float:
    """Seconds of a fixed float32 product (sixteen 256 x 256 x 256 matrix products, ~3 ms on 2
    cores), the median of `repeats`: the median, not the fastest, because a competing process
    leaves some runs untouched but slows most of them."""
    a = torch.ones(256, 256)

    def run() -> float:
        began = time.perf_counter()
        for _ in range(16):
            torch.mm(a, a)
        return time.perf_counter() - began

    with torch.inference_mode():
        run()
        return statistics.median(run() for _ in range(repeats))


def pace_now() -> float:
    """`pace()`, measured at most once per _PACE_REUSE_S in this process."""
    now = time.monotonic()
    if not _pace_now or now - _pace_now[1] > _PACE_REUSE_S:
        _pace_now[:] = [pace(), now]
    return _pace_now[0]


def measured_under_load(stored_pace: float | None, current: Callable[[], float]) -> bool:
    """Whether a measurement stored with `stored_pace` (None: stored without one) was taken on a
    machine busier than this one is now (`current`: the pace now)."""
    return stored_pace is None or stored_pace > LOADED_FACTOR * current()


def paced(measure: Callable[[], Any], current: Callable[[], float]) -> tuple[Any, float]:
    """`measure()` and the machine's pace while it ran (`current` measures it): the slower of the
    pace before and after."""
    before = current()
    result = measure()
    return result, max(before, current())


def cached(kind: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored result of `measure()` for `key`, measuring (and storing) it when missing or
    when it was measured under load."""
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    path = cache_root() / "calibration" / f"{kind}-{name}.json"
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key and not measured_under_load(stored.get("pace"), pace_now):
            return stored["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure again
    result, seconds = paced(measure, pace)
    write_atomically(path, json.dumps({"key": key, "result": result, "pace": seconds}))
    return result


def write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only means measuring again next time


def best_seconds(run: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls after one untimed one (which builds kernels): other
    processes on the machine only ever add time."""
    with torch.inference_mode():
        run()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best
