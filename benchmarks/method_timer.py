"""Seconds spent inside some methods of a class, summed over calls (for the benchmarks)."""

from __future__ import annotations

import time


def time_methods(cls: type, names: tuple[str, ...]) -> list[float]:
    """Wrap `cls`'s methods `names` so each call adds its seconds to the returned one-item list
    (reset it with `inside[0] = 0.0` between runs)."""
    inside = [0.0]
    for name in names:
        original = getattr(cls, name)

        def timed(self, *args, _original=original, **kwargs):
            began = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - began

        setattr(cls, name, timed)
    return inside
