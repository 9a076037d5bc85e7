"""The C kernel in `kernels/`, compiled on first use on this machine and loaded with ctypes.

It is plain C (no torch headers), so a build takes about a second with the system compiler;
the shared object is cached under `<cache root>/kernels/`, named by a hash of the source, the
compiler flags and the CPU, and is rebuilt when any of them changes. It is linked against
OpenMP: loaded into a process where torch has already loaded `libgomp.so.1`, it shares torch's
thread pool. Where there is no compiler, or the build or load fails, `paged_decode_kernel()`
returns None once with a warning, and callers keep the torch path (gather + fused attention),
which the kernel is tested to equal.

Set TREEBATCH_NATIVE=0 to turn the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from treebatch.models.loader import cache_root
from treebatch.runtime.calibration import _cpu_model

_SOURCE = Path(__file__).resolve().parent / "kernels" / "paged_decode.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    """The CPU's instruction set extensions: `-march=native` code must not meet a CPU without them
    (virtual machines often report one model name for several generations)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    facts = " ".join([compiler, *_FLAGS, _cpu_model(), _cpu_flags()])
    digest = hashlib.blake2b(source + facts.encode(), digest_size=10)
    target = _cache_dir() / f"paged_decode-{digest.hexdigest()}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: a concurrent build never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def paged_decode_kernel() -> ctypes.CDLL | None:
    if os.environ.get("TREEBATCH_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("treebatch: no C compiler found; decode attention gathers KV blocks instead", stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"treebatch: the decode kernel did not build ({detail.strip()[:300]}); gathering KV instead", stacklevel=2)
        return None
    function = library.paged_decode_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, pointer, pointer, pointer, i64, pointer, i64, i64, i64, i64, i64,
                         ctypes.c_float, pointer, pointer, ctypes.c_int]
    function.restype = ctypes.c_int
    return library


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One query per sequence against its paged keys, read in place.

    q: [S, H, D]; k_cache, v_cache: [num_slots, KVH, D] (one layer); block_tables: [S, width]
    int64 (unused entries may hold any valid block); lengths: [S] int64 keys per sequence.
    Returns out [S, H, D] and lse [S, H], or None where the kernel is unavailable or does not
    take these arguments (the caller then uses the torch path)."""
    library = paged_decode_kernel()
    if library is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    q = q.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    block_tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    num_seqs, num_heads, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32)
    status = library.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        lengths.data_ptr(), num_seqs, num_heads, k_cache.shape[1], dim, block_size, scale,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
    )
    return (out, lse) if status == 0 else None
