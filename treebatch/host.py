"""Facts about this machine that several layers need: where treebatch caches things, and the CPU.

Pure standard library, so anything may import it (the model loader, the default model, the
calibration, the kernel builder) without importing each other.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """Where converted models, kernels and calibrations live: $TREEBATCH_CACHE, else ~/.cache/treebatch."""
    env = os.environ.get("TREEBATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "treebatch"


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `names`, if any."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(names):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
