"""Size the paged KV cache from a memory budget and allocate it."""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from treebatch.config import CacheConfig, ModelConfig


def available_memory_bytes() -> int:
    """Memory the OS can still give us (MemAvailable), falling back to total physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_budget(cache: CacheConfig) -> int:
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    return min(int(available_memory_bytes() * cache.kv_cache_fraction), cache.max_kv_cache_memory)


def num_kv_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    bytes_per_block = model.kv_bytes_per_token(dtype_bytes) * cache.block_size
    num_blocks = kv_cache_budget(cache) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"a KV budget of {kv_cache_budget(cache)} bytes holds no block of {bytes_per_block} bytes"
        )
    return int(num_blocks)


def allocate_kv_cache(model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[layers, 2 (K, V), slots, kv_heads, head_dim]; slot = block_id * block_size + offset.

    Zeroed, because attention reads padding and the unwritten tail of a sequence's last block
    (with weight exactly 0, but 0 * NaN is NaN). The memory is an anonymous mapping, which the OS
    zero-fills on first touch, so a cache of gigabytes costs nothing until it is used (torch's
    zeros would fault every page in up front: seconds). It asks for transparent huge pages
    (where the kernel grants them on request): with 4 KB pages a step's new keys and values
    faulted in page by page inside the layer that first wrote them (a 256-token prefill chunk of
    SmolLM2-135M in bfloat16 faults ~50 pages per layer: 0.5 ms of a 40 us write), and a decode
    reading blocks scattered over the cache missed the TLB on most of them.
    """
    shape = (model.num_layers, 2, num_blocks * block_size, model.num_kv_heads, model.head_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = itemsize * int(np.prod(shape))
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: 4 KB pages it is
            pass
    raw = np.frombuffer(memory, dtype={2: np.uint16, 4: np.float32}[itemsize], count=size // itemsize)
    return torch.from_numpy(raw.reshape(shape)).view(dtype)
