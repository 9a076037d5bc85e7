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

import hashlib
import json
import time

import torch

from treebatch.host import cache_root, cpu_model, cpuinfo_field
from treebatch.layers.linear import ALL_ROWS, PACKED_MAX_ROWS, Linear

PROBE_ROWS = (48, 160, 512)
# Packed is chosen up to 10% slower than the plain kernel: chosen for every size it saves the
# memory of a second copy of the weights, worth more than a tie (in bfloat16 on AMD EPYC the
# two kernels measure within 5% of each other at every size, oneDNN serving both).
TOLERANCE = 1.10


def packed_max_rows(dtype: torch.dtype, in_features: int, out_features: int) -> int:
    """The measured crossover for a [out_features, in_features] weight in `dtype` (cached)."""
    key = {"cpu": cpu_model(), "flags": cpuinfo_field("flags", "Features") or "", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": str(dtype), "shape": [out_features, in_features],
           "rows": list(PROBE_ROWS)}
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    path = cache_root() / "calibration" / f"kernels-{name}.json"
    try:
        return int(json.loads(path.read_text())["packed_max_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    timings = probe(dtype, in_features, out_features)
    choice = crossover(timings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "seconds": timings, "packed_max_rows": choice}))
    except OSError:
        pass  # a read-only cache only means measuring again next start
    return choice


def crossover(timings: dict[int, tuple[float, float]]) -> int:
    """rows -> (packed seconds, plain seconds) -> packed_max_rows."""
    choice = PACKED_MAX_ROWS
    for rows in sorted(timings):
        packed, plain = timings[rows]
        if packed > plain * TOLERANCE:
            return choice  # the last size it won at (the fixed default if it lost at the first)
        choice = rows
    return ALL_ROWS


def probe(dtype: torch.dtype, in_features: int, out_features: int, repeats: int = 3) -> dict[int, tuple[float, float]]:
    """Best-of-`repeats` seconds of the packed and the plain kernel per probed row count; an
    empty dict where the packed kernel is not available (nothing to choose)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    packed = Linear(weight, packed_max_rows=ALL_ROWS)
    if packed.packed is None:
        return {}
    plain = Linear(weight, pack=False)
    timings: dict[int, tuple[float, float]] = {}
    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            timings[rows] = (_best(packed, x, repeats), _best(plain, x, repeats))
    return timings


def _best(linear: Linear, x: torch.Tensor, repeats: int) -> float:
    linear(x)  # the first call builds the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - start)
    return best
