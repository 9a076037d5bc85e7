"""Up to how many rows the packed oneDNN projection kernel is the fastest, measured on this CPU.

layers/linear.py runs a projection either on a weight packed once for oneDNN or on the plain
weight through torch's GEMM (MKL). Which is faster at which batch size depends on the CPU and
its libraries: on an Intel Xeon the packed kernel led up to about 40 rows and MKL beyond; on an
AMD EPYC, where MKL does not run its best code, oneDNN leads at every size, in both float32 and
bfloat16. So the engine times both on the model's widest projection at a few batch sizes before
loading the weights, once per machine (cached beside the calibrations), and every projection
follows the answer: the largest probed size up to which packed wins at every probed size
(`linear.ALL_ROWS` where it always wins: then each weight is kept packed only, one copy).

treebatch's own kernel (kernels/gemm.c, where it builds) is then timed against that choice in
the same way, from 16 rows up, and serves the batches up to where it stops winning (all of them
on an AMD EPYC with AVX2 only, in both dtypes, and in bfloat16 on an AMD EPYC with AVX512-BF16,
where its pair panels run bf16 dot products: one copy, in its panel layout; and for SmolLM2 in
bfloat16 on an Intel Xeon with AMX, where the same panels go through the matrix unit: over a
layer's projections 2.0x oneDNN's speed at 16 rows, 1.05-1.2x from 160). Its result is
checked against torch's on the probe's random inputs first; a kernel that disagrees is not used.

The bfloat16 attention over tiles (kernels/amx_tile.h) is chosen the same way: on a CPU with the
AMX matrix unit, a prefill chunk of the model's shape is timed with the unit on and off and the
faster kept (on an Intel Xeon with AMX the unit ran a 64-query chunk over 512 keys 2.8x faster
than bf16 dot products, whose instruction issues there at half the rate of a float32 FMA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import warnings

from treebatch.layers import native
from treebatch.layers.linear import ALL_ROWS, PACKED_MAX_ROWS, KernelChoice, Linear
from treebatch.runtime.machine_cache import best_seconds, cached, machine_key

PROBE_ROWS = (48, 160, 512)
NATIVE_PROBE_ROWS = (16, 48, 96, 160, 512)
# The own kernel's largest difference from torch's GEMM on the probe's inputs, relative to the
# largest output, above which it is not used: float32 sums in another order differ by ~1e-6;
# bfloat16 outputs by their rounding, 2^-8.
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
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


def choose(dtype: torch.dtype, in_features: int, out_features: int,
           layer: Sequence[tuple[int, int]] | None = None) -> KernelChoice:
    """Every projection's kernels for a [out_features, in_features] weight in `dtype` (cached);
    `layer`: the (in, out) features of each projection of a layer, whose summed time decides the
    own kernel (default: the one weight)."""
    packed = packed_max_rows(dtype, in_features, out_features)
    return KernelChoice(packed, native_max_rows(dtype, layer or [(in_features, out_features)], packed))


def native_max_rows(dtype: torch.dtype, layer: Sequence[tuple[int, int]], packed: int) -> int:
    """Up to how many rows kernels/gemm.c beats the `packed` choice over a layer's projections,
    their seconds summed (0: never, or not built). Summed, because one choice serves them all and
    they differ: on an Intel Xeon with AMX the own kernel led oneDNN 1.65x on SmolLM2's down
    projection at 512 rows and trailed 0.93x on its gate/up."""
    if not native.gemm_available():
        return 0
    key = machine_key(kernel="gemm.c", dtype=str(dtype), shapes=[list(shape) for shape in layer],
                      rows=list(NATIVE_PROBE_ROWS), packed_max_rows=packed, source=native.source_digest("gemm"))

    def measure() -> dict[str, Any]:
        timings = probe_native(dtype, layer, packed)
        return {"seconds": timings}

    seconds = cached("kernels", key, measure)["seconds"]  # the timings kept, read under today's rule
    return own_rows({int(rows): (float(own), float(other)) for rows, (own, other) in seconds.items()}, packed)


def own_rows(timings: dict[int, tuple[float, float]], packed: int) -> int:
    """Up to how many rows the own kernel serves beside `packed`: as far as it ties or wins
    (crossover), or only as far as it wins by TOLERANCE, whichever keeps fewer copies of the
    weights (the first where they keep as many). On an Intel Xeon with AMX a float32 tie at 16
    rows had kept three copies; Llama-1B's bf16 layer, won by 20% at 16 rows and tied at 48, keeps
    two with the tie (the packed copy is then not needed) and would keep three without it."""
    if not timings:
        return 0
    candidates = (crossover(timings, lost_at_once=0), crossover(timings, lost_at_once=0, tolerance=1 / TOLERANCE))
    return min(candidates, key=lambda rows: KernelChoice(packed, rows).copies)


def crossover(timings: dict[int, tuple[float, float]], lost_at_once: int = PACKED_MAX_ROWS,
              tolerance: float = TOLERANCE) -> int:
    """rows -> (candidate seconds, incumbent seconds) -> up to how many rows the candidate runs
    (`lost_at_once` where it loses at the first size): while it takes at most `tolerance` times
    the incumbent's seconds."""
    choice = lost_at_once
    for rows in sorted(timings):
        packed, plain = timings[rows]
        if packed > plain * tolerance:
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


def probe_native(dtype: torch.dtype, layer: Sequence[tuple[int, int]], packed: int,
                 repeats: int = 5) -> dict[int, tuple[float, float]]:
    """As `probe`, for kernels/gemm.c against the projections as `packed` has them, the layer's
    (in, out) shapes' seconds summed per row count; an empty dict where the kernel's result is
    not torch's (it is then not used)."""
    generator = torch.Generator().manual_seed(1)
    timings: dict[int, tuple[float, float]] = {rows: (0.0, 0.0) for rows in NATIVE_PROBE_ROWS}
    for in_features, out_features in layer:
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
        own = Linear(weight, native_max_rows=ALL_ROWS)
        incumbent = Linear(weight, packed_max_rows=packed)
        for rows in NATIVE_PROBE_ROWS:
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            with torch.inference_mode():
                expected = (x.float() @ weight.float().t())
                error = (own(x).float() - expected).abs().max().item() / expected.abs().max().item()
            if not error <= AGREEMENT[dtype]:
                warnings.warn(f"treebatch: kernels/gemm.c differs from torch by {error:.1e} (relative) at {rows} "
                              f"rows in {dtype}; its projections are not used", stacklevel=2)
                return {}
            runs = [(best_seconds(lambda: own(x), 1), best_seconds(lambda: incumbent(x), 1)) for _ in range(repeats)]
            so_far = timings[rows]
            timings[rows] = (so_far[0] + min(p for p, _ in runs), so_far[1] + min(q for _, q in runs))
    return timings


AMX_PROBE = (64, 512)  # queries of a causal chunk at the end of this many keys


def attention_amx(dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the bfloat16 tile kernels run on the AMX matrix unit: where it exists, whichever is
    faster on a prefill chunk of this shape (cached); sets the kernels' switch to the answer."""
    if dtype != torch.bfloat16 or not native.chunk_attention_available(dtype):
        return False  # the switch is the bfloat16 tile kernels' alone: left as it is
    if not native.attention_amx(True):
        return False
    key = machine_key(kernel="amx_tile.h", shape=[heads, kv_heads, dim], probe=list(AMX_PROBE),
                      source=native.source_digest("chunk_attention"))

    def measure() -> dict[str, Any]:
        seconds = probe_amx(heads, kv_heads, dim)
        return {"seconds": seconds, "amx": seconds[0] < seconds[1]}

    return native.attention_amx(bool(cached("kernels", key, measure)["amx"]))


def probe_amx(heads: int, kv_heads: int, dim: int, repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` seconds of AMX_PROBE's chunk with the matrix unit on and off, alternated."""
    generator = torch.Generator().manual_seed(2)
    queries, length = AMX_PROBE
    block_size = 16
    k = torch.randn(length, kv_heads, dim, generator=generator).bfloat16()
    v = torch.randn(length, kv_heads, dim, generator=generator).bfloat16()
    q = torch.randn(queries, heads, dim, generator=generator).bfloat16()
    blocks = torch.arange(length // block_size)

    def run(amx: bool) -> float:
        native.attention_amx(amx)
        return best_seconds(lambda: native.chunk_attention(q, k, v, blocks, length, length - queries + 1,
                                                           block_size, dim**-0.5), 1)

    runs = [(run(True), run(False)) for _ in range(repeats)]
    return min(on for on, _ in runs), min(off for _, off in runs)
