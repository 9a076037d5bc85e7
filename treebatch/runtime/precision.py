"""Which compute dtype `dtype="auto"` means on this machine.

bfloat16 halves the bytes of every weight and every cached key and value, and on a CPU with
bf16 matrix instructions (Intel AMX-BF16, AVX512-BF16 on Intel and AMD) its products run two to
four times faster than float32's; elsewhere bf16 products are emulated and slower than float32.
So `auto` is bfloat16 where the CPU's flags name such instructions and a short measurement of
the projection kernel confirms it (the flags of a virtual machine do not always mean fast
hardware), and float32 elsewhere. The measurement takes about a second and is cached with the
calibrations, keyed by CPU, flags, thread count and torch version.

`dtype="float32"` stays available for exactness against a float32 reference. Set
TREEBATCH_FORCE_FP32_CPU=1 to treat the CPU as one without bf16 instructions.
"""

from __future__ import annotations

import os

import torch

from treebatch.host import cpuinfo_field
from treebatch.layers.linear import Linear
from treebatch.runtime.machine_cache import best_seconds, cached, machine_key

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bfloat16 must be at least this much faster than float32 on the probe to be chosen.
REQUIRED_SPEEDUP = 1.25
_PROBE_ROWS, _PROBE_IN, _PROBE_OUT = 256, 1024, 2048


def native_bf16() -> bool:
    """Whether the CPU reports bf16 matrix instructions (False under TREEBATCH_FORCE_FP32_CPU=1)."""
    if os.environ.get("TREEBATCH_FORCE_FP32_CPU", "0") == "1":
        return False
    flags = set((cpuinfo_field("flags", "Features") or "").split())
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(requested: str) -> str:
    """`requested` itself, or for "auto": "bfloat16" where it is native and measured faster,
    else "float32"."""
    if requested != "auto":
        return requested
    if not native_bf16():
        return "float32"
    return "bfloat16" if bf16_speedup() >= REQUIRED_SPEEDUP else "float32"


def bf16_speedup() -> float:
    """float32 seconds over bfloat16 seconds for one projection of a 1B-class layer's width, as
    `Linear` runs it: measured once per machine and cached."""
    def measure() -> dict[str, float]:
        return {"bf16_speedup": _probe_seconds(torch.float32) / _probe_seconds(torch.bfloat16)}

    return float(cached("precision", machine_key(probe=[_PROBE_ROWS, _PROBE_IN, _PROBE_OUT]), measure)["bf16_speedup"])


def _probe_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    generator = torch.Generator().manual_seed(0)
    linear = Linear(torch.randn(_PROBE_OUT, _PROBE_IN, generator=generator).to(dtype))
    x = torch.randn(_PROBE_ROWS, _PROBE_IN, generator=generator).to(dtype)
    return best_seconds(lambda: linear(x), repeats)
