"""The C kernels in `kernels/`, compiled on first use on this machine and loaded with ctypes.

- `paged_decode.c`: single-query attention that reads the paged KV cache (float32 or bfloat16)
  in place.
- `gemm.c`: projections on weights packed in 16-feature panels (AVX2 + FMA), or for bfloat16 on
  AVX512-BF16, in 32-feature panels by pairs of k (bf16 dot products).
- `layer_ops.c`: residual add + RMSNorm, and SiLU(gate) x up, one pass each; greedy
  sampling's argmax over each row of logits.
- `rope_cache.c`: q/k norms, the rotary embedding and the KV cache write, one pass.
- `chunk_attention.c`: prefill chunks' attention over the paged cache, bfloat16 (AVX512-BF16) or
  float32 (AVX-512), by tiles of sixteen keys (`tile_attend.h`).

They are plain C (no torch headers), so a build takes about a second with the system compiler;
each shared object is cached under `<cache root>/kernels/`, named by a hash of its source, the
shared headers, the compiler flags and the CPU, and is rebuilt when any of them changes. They are
linked against OpenMP: loaded into a process where torch has already loaded `libgomp.so.1`, they
share torch's thread pool. Where there is no compiler, or a build or load fails, `library()`
returns None once with a warning, and every caller keeps its torch path, which each kernel is
tested to equal.

Set TREEBATCH_NATIVE=0 to turn the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch

from treebatch.host import cache_root, cpu_model, cpuinfo_field

_KERNELS = Path(__file__).resolve().parent / "kernels"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_POINTER, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# Each library: its source in kernels/ and the C signatures of the functions it exports.
_SIGNATURES = {
    "paged_decode": {
        name: [_POINTER, _POINTER, _POINTER, _POINTER, _I64, _POINTER, _I64, _I64, _I64, _I64, _I64, _F32, _I64,
               _F32, _POINTER, _POINTER, _INT]
        for name in ("paged_decode_attention", "paged_decode_attention_bf16")
    } | {
        name: [_POINTER, _POINTER, _POINTER, _POINTER, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _POINTER, _POINTER, _INT]
        for name in ("cascade_decode_attention", "cascade_decode_attention_bf16")
    } | {"attention_amx": [_INT]},
    "layer_ops": {
        "add_rms_norm": [_POINTER, _POINTER, _POINTER, _F32, _I64, _I64, _POINTER, _INT, _INT],
        "silu_mul": [_POINTER, _I64, _I64, _POINTER, _INT, _INT],
        "argmax_rows": [_POINTER, _I64, _I64, _POINTER, _INT],
    },
    "rope_cache": {
        "rope_store": [_POINTER, _I64, _I64, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _F32,
                       _POINTER, _POINTER, _POINTER, _POINTER, _INT, _INT],
    },
    "chunk_attention": {
        "chunk_attention_available": [_INT],
        "chunk_attention_bf16": [_POINTER, _I64, _I64, _I64, _POINTER, _POINTER, _I64, _POINTER, _I64, _F32, _POINTER,
                                 _POINTER, _INT],
        "chunk_attention_f32": [_POINTER, _I64, _I64, _I64, _POINTER, _POINTER, _I64, _POINTER, _I64, _F32, _POINTER,
                                _POINTER, _INT],
        "lay_out_tiles": [_INT, _POINTER, _POINTER, _POINTER, _I64, _I64, _I64, _I64, _POINTER, _INT],
        "attention_amx": [_INT],
    },
    "gemm": {
        "gemm_available": [],
        "gemm": [_POINTER, _INT, _I64, _I64, _POINTER, _INT, _I64, _POINTER, _POINTER, _INT, _INT],
        "gemm_pairs_available": [],
        "gemm_pairs": [_POINTER, _I64, _I64, _POINTER, _I64, _POINTER, _POINTER, _INT, _INT],
        "gemm_pairs_gated": [_POINTER, _I64, _I64, _POINTER, _I64, _POINTER, _INT],
    },
}


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def source_digest(name: str) -> str:
    """A hash of kernels/`name`.c and the shared headers: a measurement of the kernel keys on it."""
    return hashlib.blake2b(_source_text(name), digest_size=8).hexdigest()


def _source_text(name: str) -> bytes:
    source = _KERNELS / f"{name}.c"
    return source.read_bytes() + b"".join(header.read_bytes() for header in sorted(_KERNELS.glob("*.h")))


def _build(name: str, compiler: str) -> Path:
    source = _KERNELS / f"{name}.c"
    text = _source_text(name)
    # The CPU's instruction set extensions too: `-march=native` code must not meet a CPU without
    # them (virtual machines often report one model name for several generations).
    facts = " ".join([compiler, *_FLAGS, cpu_model(), cpuinfo_field("flags", "Features") or ""])
    digest = hashlib.blake2b(text + facts.encode(), digest_size=10)
    target = _cache_dir() / f"{name}-{digest.hexdigest()}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        command = [compiler, *_FLAGS, f"-I{_KERNELS}", str(source), "-o", tmp, "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: a concurrent build never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernels/`name`.c, or None (with one warning) where it cannot be had."""
    if os.environ.get("TREEBATCH_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(f"treebatch: no C compiler found; {name} runs as torch ops instead", stacklevel=2)
        return None
    try:
        loaded = ctypes.CDLL(str(_build(name, compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"treebatch: {name} did not build ({detail.strip()[:300]}); torch ops instead", stacklevel=2)
        return None
    for function, argtypes in _SIGNATURES[name].items():
        getattr(loaded, function).argtypes = argtypes
        getattr(loaded, function).restype = ctypes.c_int
    return loaded


def paged_decode_kernel() -> ctypes.CDLL | None:
    return library("paged_decode")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One query per sequence against its paged keys, read in place.

    q: [S, H, D]; k_cache, v_cache: [num_slots, KVH, D] (one layer), float32 or bfloat16, with
    q of the same dtype; block_tables: [S, width] int64 (unused entries may hold any valid
    block); lengths: [S] int64 keys per sequence. Returns out [S, H, D] in q's dtype and lse
    [S, H] float32, or None where the kernel is unavailable or does not take these arguments
    (the caller then uses the torch path). A bfloat16 cache is read as it is, widened to float32
    per element inside the kernel, and so are the queries; the result is rounded once.
    `window`: each query sees only its last `window` keys; `softcap`: scores soft-capped to
    +-softcap by tanh (None: neither). `out`: where to write the result (contiguous, q's shape
    and dtype), else a new tensor."""
    function = _in_place_function(_DECODE_BY_DTYPE, q, k_cache, v_cache)
    if function is None:
        return None
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    num_seqs, num_heads, dim = q.shape
    out = _output_for(q, out)
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32)
    status = function(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        lengths.data_ptr(), num_seqs, num_heads, k_cache.shape[1], dim, block_size, scale, window or 0, softcap or 0.0,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
    )
    return (out, lse) if status == 0 else None


def _output_for(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out`, checked to take q's results in place, or a new tensor like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(q.shape)} {q.dtype}, not {tuple(out.shape)} {out.dtype}")
    return out


_DECODE_BY_DTYPE = {torch.float32: "paged_decode_attention", torch.bfloat16: "paged_decode_attention_bf16"}


def _in_place_function(
    names: dict[torch.dtype, str], q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> Callable[..., int] | None:
    """paged_decode.c's function of `names` for this cache's dtype, or None where the kernel is
    not built or does not take these tensors (q, k and v of one dtype, the caches contiguous)."""
    kernel = paged_decode_kernel()
    name = names.get(k_cache.dtype)
    if kernel is None or name is None or q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        return None
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    return getattr(kernel, name)


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_blocks: torch.Tensor,
    suffix_tables: torch.Tensor,
    suffix_lengths: torch.Tensor,
    block_size: int,
    scale: float,
    softcap: float | None = None,
    prefix_tiles: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The single-query rows of one shared-prefix group against the group's prefix and then each
    row's own keys, read in place: each prefix block is read once for all the rows (in runs of
    rows, where threads need more work items), not once per row.

    q: [M, H, D]; prefix_blocks: [P / block_size] int64, the prefix's full blocks; suffix_tables:
    [M, width] int64 each member's blocks after the prefix; suffix_lengths: [M] int64 its keys
    there. Returns out [M, H, D] in q's dtype and lse [M, H] float32 over prefix and own keys
    together (no merge left to do), or None as paged_decode_attention does. No sliding window:
    a layer with one takes the torch cascade. `prefix_tiles`: the prefix as lay_out_tiles made
    it, read instead of laying each tile out again."""
    group = CascadeDecode(prefix_blocks, suffix_tables, suffix_lengths, prefix_tiles)
    return cascade_decode_groups(q, k_cache, v_cache, [group], block_size, scale, softcap)


class CascadeDecode(NamedTuple):
    """One group's part of a cascade_decode_groups call (as cascade_decode_attention's arguments)."""

    prefix_blocks: torch.Tensor
    suffix_tables: torch.Tensor  # [members, width]
    suffix_lengths: torch.Tensor  # [members]
    prefix_tiles: torch.Tensor | None = None


def cascade_decode_groups(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: Sequence[CascadeDecode],
    block_size: int,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cascade_decode_attention for several groups in one call (one pass of Python and one team
    of threads per layer, not per group): q [sum of the members, H, D] holds the groups' rows in
    the order of `groups`, and so do the results."""
    table = KernelTable.of_groups(groups, block_size)
    if table.rows != q.shape[0]:
        raise ValueError(f"the groups hold {table.rows} rows, q {q.shape[0]}")
    return cascade_decode_table(q, k_cache, v_cache, table.fields, block_size, scale, softcap)


def cascade_decode_table(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    fields: torch.Tensor,
    block_size: int,
    scale: float,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cascade_decode_groups on a table KernelTable.of_groups made (kept across a step's layers,
    its tiles column filled per layer), q holding every row the table names: the results at
    those rows of `out` (as for paged_decode_attention) and of lse; other rows untouched."""
    function = _in_place_function(_CASCADE_BY_DTYPE, q, k_cache, v_cache)
    if function is None:
        return None
    q = q.contiguous()
    num_rows, num_heads, dim = q.shape
    out = _output_for(q, out)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32)
    status = function(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), fields.data_ptr(), fields.shape[0], num_heads,
        k_cache.shape[1], dim, block_size, scale, softcap or 0.0, out.data_ptr(), lse.data_ptr(),
        torch.get_num_threads(),
    )
    return (out, lse) if status == 0 else None


class KernelTable(NamedTuple):
    """The int64 table a kernel call of several groups or chunks reads (a row of fields each, as
    paged_decode.c's and chunk_attention.c's enums lay them out), the tensors whose addresses it
    holds (kept alive with it), its query rows, and which column takes each row's laid-out tiles."""

    fields: torch.Tensor
    held: list[torch.Tensor]
    rows: int  # the rows past the last one the table names
    tiles_column: int

    @staticmethod
    def of_groups(groups: Sequence[CascadeDecode], block_size: int,
                  first_rows: Sequence[int] | None = None) -> KernelTable:
        """`first_rows`: each group's first row in q and out (default: the groups' rows one after
        the other from row 0)."""
        held, fields, row = [], [], 0
        for i, group in enumerate(groups):
            if first_rows is not None:
                row = first_rows[i]
            prefix, tables, lengths = (t.contiguous() for t in (group.prefix_blocks, group.suffix_tables,
                                                                 group.suffix_lengths))
            held += [prefix, tables, lengths]
            members = tables.shape[0]
            fields.append([row, members, prefix.data_ptr(), prefix.numel() * block_size, _address(group.prefix_tiles),
                           tables.data_ptr(), tables.shape[1], lengths.data_ptr()])
            row += members
        return KernelTable(torch.tensor(fields, dtype=torch.int64).view(len(fields), 8), held, row, 4)

    @staticmethod
    def of_chunks(parts: Sequence[ChunkPart]) -> KernelTable:
        held, fields = [], []
        for part in parts:
            blocks = part.blocks.contiguous()
            prefix = None if part.prefix_blocks is None else part.prefix_blocks.contiguous()
            held += [blocks] if prefix is None else [blocks, prefix]
            fields.append([part.row, part.n, blocks.data_ptr(), part.length, part.base, _address(part.tiles),
                           _address(prefix), part.prefix_len if prefix is not None else 0,
                           _address(part.prefix_tiles)])
        return KernelTable(torch.tensor(fields, dtype=torch.int64).view(len(fields), 9), held,
                           sum(part.n for part in parts), 8)

    def with_tiles(self, tiles: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The fields with row i's tiles column set to tiles[i]'s address (0 for None)."""
        fields = self.fields.clone()
        fields[:, self.tiles_column] = torch.tensor([_address(t) for t in tiles], dtype=torch.int64)
        return fields


_CASCADE_BY_DTYPE = {torch.float32: "cascade_decode_attention", torch.bfloat16: "cascade_decode_attention_bf16"}



@cache
def chunk_attention_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether kernels/chunk_attention.c built here with its tile code for `dtype` (float32:
    AVX-512; bfloat16: AVX512-BF16 too)."""
    kernel = library("chunk_attention")
    return (dtype in _CHUNK_BY_DTYPE and kernel is not None
            and kernel.chunk_attention_available(int(dtype == torch.float32)) == 1)


_CHUNK_BY_DTYPE = {torch.float32: "chunk_attention_f32", torch.bfloat16: "chunk_attention_bf16"}
_TILE_LIBRARIES = ("chunk_attention", "paged_decode")


def attention_amx(wanted: bool | None = None) -> bool:
    """Whether the bfloat16 tile kernels (prefill chunks, a group's decodes over its prefix) run
    on the AMX matrix unit (kernels/amx_tile.h); `wanted` sets it first. False where the build,
    the CPU or the operating system has none."""
    flag = -1 if wanted is None else int(wanted)
    answers = [kernel.attention_amx(flag) == 1 for kernel in map(library, _TILE_LIBRARIES) if kernel is not None]
    return bool(answers) and all(answers)


def chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    length: int,
    base: int,
    block_size: int,
    scale: float,
    tiles: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The queries of one chunk against keys [0, length) of `blocks`, read in place: query i sees
    keys [0, min(length, base + i)) (base = length - n + 1: causal at the end of the context;
    base = length: every key).

    q: [n, H, D] bfloat16 or float32; k_cache, v_cache: [slots, KVH, D] of q's dtype, contiguous;
    blocks: int64 block ids holding the keys. Returns out [n, H, D] (q's dtype) and lse [n, H] float32, or None
    where the kernel is unavailable or does not take these arguments (the caller then uses the
    torch path). `tiles`: these keys as lay_out_tiles made them, read instead of the cache."""
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32)
    part = ChunkPart(0, q.shape[0], blocks, length, base, tiles)
    return (out, lse) if chunk_attention_parts(q, k_cache, v_cache, [part], block_size, scale, out, lse) else None


class ChunkPart(NamedTuple):
    """One prefill chunk of a chunk_attention_parts call: its queries, rows [row, row + n) of q,
    against keys [0, length) of `blocks`, query i seeing the first base + i of them (`tiles`:
    those keys laid out, or None), after every key of its group's prefix, if any (prefix_len
    keys of prefix_blocks; prefix_tiles: laid out, or None)."""

    row: int
    n: int
    blocks: torch.Tensor
    length: int
    base: int
    tiles: torch.Tensor | None = None
    prefix_blocks: torch.Tensor | None = None
    prefix_len: int = 0
    prefix_tiles: torch.Tensor | None = None


def chunk_attention_parts(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    parts: Sequence[ChunkPart],
    block_size: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> bool:
    """Every prefill chunk of a step's layer by one call of the in-place kernel, a group member's
    chunk over its group's prefix and its own keys in one softmax (nothing to merge): writes
    out [T, H, D] (q's dtype) at each part's rows and, if given, lse [T, H] (float32).
    False where the kernel is unavailable or does not take these arguments (nothing written)."""
    table = KernelTable.of_chunks(parts)
    return chunk_attention_table(q, k_cache, v_cache, table.fields, block_size, scale, out, lse)


def chunk_attention_table(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    fields: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> bool:
    """chunk_attention_parts on a table KernelTable.of_chunks made (kept across a step's layers,
    its prefix tiles column filled per layer)."""
    if q.dtype != k_cache.dtype or out.dtype != q.dtype or not _tile_kernels_take(k_cache, v_cache):
        return False
    if not (q.is_contiguous() and out.is_contiguous()):
        raise ValueError("chunk_attention_parts: q and out must be contiguous")
    status = getattr(library("chunk_attention"), _CHUNK_BY_DTYPE[q.dtype])(
        q.data_ptr(), q.shape[1], k_cache.shape[1], q.shape[2], k_cache.data_ptr(), v_cache.data_ptr(), block_size,
        fields.data_ptr(), fields.shape[0], scale, out.data_ptr(), None if lse is None else lse.data_ptr(),
        torch.get_num_threads(),
    )
    return status == 0


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def lay_out_tiles(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, length: int,
                  block_size: int) -> torch.Tensor | None:
    """Keys and values [0, length) of `blocks` laid out as the tile kernels read them
    (kernels/tile_attend.h: per KV head, tiles of sixteen keys), as many bytes as the K and V
    themselves; None where the kernel is unavailable or does not take them."""
    if not _tile_kernels_take(k_cache, v_cache):
        return None
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    blocks = blocks.contiguous()
    # A tile holds sixteen keys' K and V: 2 x 16 x dim elements, as 32-bit words.
    words = _TILE_KEYS * dim * k_cache.element_size() // 2
    tiles = torch.empty(kv_heads, -(-length // _TILE_KEYS), words, dtype=torch.int32)
    status = library("chunk_attention").lay_out_tiles(
        int(k_cache.dtype == torch.float32), k_cache.data_ptr(), v_cache.data_ptr(), blocks.data_ptr(), block_size,
        length, kv_heads, dim, tiles.data_ptr(), torch.get_num_threads(),
    )
    return tiles if status == 0 else None


_TILE_KEYS = 16  # keys per tile in kernels/tile_common.h


def _tile_kernels_take(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether chunk_attention.c's kernels built here and read these caches (contiguous, one dtype)."""
    return (k_cache.dtype == v_cache.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()
            and chunk_attention_available(k_cache.dtype))


@cache
def gemm_available() -> bool:
    """Whether kernels/gemm.c built here with its vector code (AVX2 and FMA)."""
    kernel = library("gemm")
    return kernel is not None and kernel.gemm_available() == 1


@cache
def gemm_pairs_available() -> bool:
    """Whether kernels/gemm.c multiplies bfloat16 by pairs with AVX512-BF16 here."""
    return gemm_available() and library("gemm").gemm_pairs_available() == 1


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the layout kernels/gemm.c reads, in the weight's dtype: [ceil(N / 16), K, 16]
    (zero rows pad the last panel), or for a bfloat16 weight where gemm_pairs_available(),
    [ceil(N / 32), ceil(K / 2), 32, 2] (panels of 32 features by pairs of k; zeros pad the last
    panel and an odd K)."""
    out_features, in_features = weight.shape
    pairs = weight.dtype == torch.bfloat16 and gemm_pairs_available()
    width = _PAIR_PANEL if pairs else _PANEL
    padded = -(-out_features // width) * width
    padded_in = in_features + in_features % 2 if pairs else in_features
    if padded != out_features or padded_in != in_features:
        weight = torch.nn.functional.pad(weight, (0, padded_in - in_features, 0, padded - out_features))
    if pairs:
        return weight.reshape(padded // width, width, padded_in // 2, 2).transpose(1, 2).contiguous()
    return weight.reshape(padded // width, width, in_features).transpose(1, 2).contiguous()


def gemm(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in `out_dtype` (float32 or bfloat16; default x's dtype),
    for `panels` = pack_panels(W) and a float32 bias: 16-feature panels (float32 or bfloat16)
    with x of either dtype, pair panels with a bfloat16 x. Call only where gemm_available()."""
    x = x.contiguous()
    rows, in_features = x.shape
    y = torch.empty(rows, out_features, dtype=out_dtype or x.dtype)
    bias_pointer = None if bias is None else bias.data_ptr()
    if panels.dim() == 4:
        if x.dtype != torch.bfloat16:
            raise ValueError(f"gemm: pair panels take a bfloat16 x, not {x.dtype}")
        status = library("gemm").gemm_pairs(x.data_ptr(), rows, in_features, panels.data_ptr(), out_features,
                                            bias_pointer, y.data_ptr(), int(y.dtype == torch.bfloat16),
                                            torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"gemm: no scratch memory for a {rows} x {in_features} bfloat16 batch")
        return y
    status = library("gemm").gemm(
        x.data_ptr(), x.dtype == torch.bfloat16, rows, in_features, panels.data_ptr(), panels.dtype == torch.bfloat16,
        out_features, bias_pointer, y.data_ptr(), y.dtype == torch.bfloat16, torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"gemm: no scratch memory for a {rows} x {in_features} bfloat16 batch")
    return y


def gemm_gated(x: torch.Tensor, panels: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """silu(x @ gate^T) * (x @ up^T) -> [M, out_features / 2] bfloat16, for a bfloat16 x and the
    pair panels of a gated MLP's [gate; up] weight, the activation taken from the float32 sums
    (kernels/gemm.c's gemm_pairs_gated); None where it does not run here (no AMX, or a size it
    does not take): the caller then projects and activates apart."""
    if panels.dim() != 4 or x.dtype != torch.bfloat16 or not _gated_runs(x.shape[1], out_features):
        return None
    x = x.contiguous()
    y = torch.empty(x.shape[0], out_features // 2, dtype=torch.bfloat16)
    status = library("gemm").gemm_pairs_gated(x.data_ptr(), x.shape[0], x.shape[1], panels.data_ptr(), out_features,
                                              y.data_ptr(), torch.get_num_threads())
    return y if status == 0 else None


@cache
def _gated_runs(in_features: int, out_features: int) -> bool:
    """Whether gemm_pairs_gated takes this shape on this CPU, asked once with an empty batch (so a
    CPU without AMX does not allocate and call for nothing at every layer of every step)."""
    kernel = library("gemm")
    return kernel is not None and kernel.gemm_pairs_gated(None, 0, in_features, None, out_features, None, 1) == 0


_PANEL = 16  # output features per panel in kernels/gemm.c
_PAIR_PANEL = 32  # output features per pair panel


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden += residual (in place; none: no add), then RMSNorm(hidden) * weight, in one pass.
    hidden, residual: [rows, dim] contiguous, float32 or bfloat16 alike; weight: [dim] float32."""
    kernel = library("layer_ops")
    if kernel is None or not _fusable(hidden, residual):
        if residual is not None:
            hidden.add_(residual)
        return torch.nn.functional.rms_norm(hidden, weight.shape, weight.to(hidden.dtype), eps)
    out = torch.empty_like(hidden)
    kernel.add_rms_norm(hidden.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                        hidden.shape[0], hidden.shape[1], out.data_ptr(), hidden.dtype == torch.bfloat16,
                        torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 x dim] (gate, then up) -> silu(gate) * up, [rows, dim], in one pass."""
    kernel = library("layer_ops")
    if kernel is None or not _fusable(gate_up, None):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    kernel.silu_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr(), gate_up.dtype == torch.bfloat16,
                    torch.get_num_threads())
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a [rows, n] float32 x (the first index of each row's largest value,
    or of its first NaN), by one parallel pass per row: torch's runs ~2.5 G values/s here, a
    2.7 ms step of its own for 128 rows of a 49k vocabulary."""
    kernel = library("layer_ops")
    if kernel is None or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    kernel.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def _fusable(x: torch.Tensor, other: torch.Tensor | None) -> bool:
    return (x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.is_contiguous()
            and (other is None or (other.dtype == x.dtype and other.shape == x.shape and other.is_contiguous())))


def rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor | None:
    """From a layer's qkv rows to its rotated queries, with the rotated keys and the values
    written to their cache slots, in one pass (kernels/rope_cache.c).

    qkv: [T, (heads + 2 kv_heads) * D] contiguous; cos, signed_sin: [positions, R] as
    models/rope.py makes them; positions, slot_mapping: [T] int64; k_cache, v_cache: [slots,
    kv_heads, D] contiguous; q_norm, k_norm: [D] float32 per-head RMSNorm weights (both or
    neither). All but the norm weights share qkv's dtype, float32 or bfloat16. Returns q [T,
    heads, D], or None where the kernel is unavailable or does not take these arguments (the
    caller then uses the torch path, which it is tested to equal)."""
    kernel = library("rope_cache")
    dtype = qkv.dtype
    if (kernel is None or dtype not in (torch.float32, torch.bfloat16) or qkv.dim() != 2 or not qkv.is_contiguous()
            or any(t.dtype != dtype or not t.is_contiguous() for t in (cos, signed_sin, k_cache, v_cache))
            or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64
            or (q_norm is None) != (k_norm is None)
            or (q_norm is not None and (q_norm.dtype != torch.float32 or k_norm.dtype != torch.float32))):
        return None
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()  # alive through the call
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q = qkv.new_empty(tokens, num_heads, head_dim)
    status = kernel.rope_store(
        qkv.data_ptr(), tokens, num_heads, num_kv_heads, head_dim, cos.shape[-1], cos.data_ptr(), signed_sin.data_ptr(),
        positions.data_ptr(), None if q_norm is None else q_norm.data_ptr(),
        None if k_norm is None else k_norm.data_ptr(), eps, slot_mapping.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), q.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads(),
    )
    return q if status == 0 else None
