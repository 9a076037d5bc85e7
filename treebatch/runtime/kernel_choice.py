"""Up to how many rows the packed oneDNN projection kernel is the fastest, measured on this CPU.

layers/linear.py runs a projection either on a weight packed once for oneDNN or on the plain
weight through torch's GEMM (MKL). Which is faster at which batch size depends on the CPU and
its libraries: on an Intel Xeon the packed kernel led up to about 40 rows and MKL beyond; on an
AMD EPYC, where MKL does not run its best code, oneDNN leads at every size, in both float32 and
bfloat16. So the engine times both on the model's widest projection at a few batch sizes before
loading the weights, once per machine (cached beside the calibrations), and every projection
follows the answer: the largest probed size up to which packed wins at every probed size
(`linear.ALL_ROWS` where it always wins: then each weight is kept packed only, one copy).
"""

from __future__ import annotations

from typing import Any

import torch

from treebatch.layers.linear import ALL_ROWS, PACKED_MAX_ROWS, Linear
from treebatch.runtime.machine_cache import best_seconds, cached, machine_key

PROBE_ROWS = (48, 160, 512)
# Packed is chosen up to 10% slower than the plain kernel: chosen for every size it saves the
# memory of a second copy of the weights, worth more than a tie (in bfloat16 on AMD EPYC the
# two kernels measure within 5% of each other at every size, oneDNN serving both).
TOLERANCE = 1.10


def packed_max_rows(dtype: torch.dtype, in_features: int, out_features: int) -> int:
    """The measured crossover for a [out_features, in_features] weight in `dtype` (cached)."""
    key = machine_key(dtype=str(dtype), shape=[out_features, in_features], rows=list(PROBE_ROWS))

    def measure() -> dict[str, Any]:
        timings = probe(dtype, in_features, out_features)
        return {"seconds": timings, "packed_max_rows": crossover(timings)}

    return int(cached("kernels", key, measure)["packed_max_rows"])


def crossover(timings: dict[int, tuple[float, float]]) -> int:
    """rows -> (packed seconds, plain seconds) -> packed_max_rows."""
    choice = PACKED_MAX_ROWS
    for rows in sorted(timings):
        packed, plain = timings[rows]
        if packed > plain * TOLERANCE:
            return choice  # the last size it won at (the fixed default if it lost at the first)
        choice = rows
    return ALL_ROWS


def probe(dtype: torch.dtype, in_features: int, out_features: int, repeats: int = 5) -> dict[int, tuple[float, float]]:
    """Best-of-`repeats` seconds of the packed and the plain kernel per probed row count, the two
    timed in alternation (so a machine that slows down for a moment slows both; timed one after
    the other, a 10% tie in bfloat16 once read as a 24% loss); an empty dict where the packed
    kernel is not available (nothing to choose)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    packed = Linear(weight, packed_max_rows=ALL_ROWS)
    if packed.packed is None:
        return {}
    plain = Linear(weight, pack=False)
    timings: dict[int, tuple[float, float]] = {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        runs = [(best_seconds(lambda: packed(x), 1), best_seconds(lambda: plain(x), 1)) for _ in range(repeats)]
        timings[rows] = (min(p for p, _ in runs), min(q for _, q in runs))
    return timings
