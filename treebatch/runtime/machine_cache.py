"""Measurements of this machine made once and kept: one JSON file per kind and key.

The start-up probes (runtime/precision.py: is bf16 faster here; runtime/kernel_choice.py: where
the packed projection kernel wins) depend on the CPU, its flags, torch's version and thread
count, and their own inputs. `cached` reads `<cache root>/calibration/<kind>-<key hash>.json`
or measures and writes it atomically; a read-only cache only means measuring again.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def cached(kind: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored result of `measure()` for `key`, measuring (and storing) it when missing."""
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    path = cache_root() / "calibration" / f"{kind}-{name}.json"
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure again
    result = measure()
    write_atomically(path, json.dumps({"key": key, "result": result}))
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
