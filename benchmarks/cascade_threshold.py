"""Where shared-prefix attention starts to pay: plain paged attention vs the cascade form for one
group of N decoding members over a shared prefix, on the default model's attention shape.

    .venv/bin/python benchmarks/cascade_threshold.py [--prefix 448] [--suffix 48] [--heads 9 --kv-heads 3]
        [--gather-prefix]

Prints the time per layer call of each path for N = 1..32 and the smallest N where the cascade
is faster; the runner's `CASCADE_MIN_DECODES_IN_PLACE` comes from this (`--heads 32 --kv-heads 8`:
Llama-3.2-1B's shape). With the C kernel built, plain decodes read their whole context in place
and the cascade's decodes read the prefix blocks once per run of members in the same pass. Without
it, the torch cascade reads the prefix K/V kept across steps (the steady state of a running
group); `--gather-prefix` gathers it every call (a group's first step).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.core.step_layout import StepLayout, layout_step
from treebatch.layers.attention import paged_attention
from treebatch.runtime.step_inputs import build_step_inputs
from treebatch.runtime.prefix_store import PrefixKVStore

DIM, BLOCK = 64, 16


def time_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", type=int, default=448, help="shared prefix tokens (multiple of 16)")
    parser.add_argument("--suffix", type=int, default=48, help="each member's own tokens so far")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    parser.add_argument("--gather-prefix", action="store_true", help="no prefix store: gather every call")
    args = parser.parse_args()
    heads, kv_heads = args.heads, args.kv_heads
    torch.set_num_threads(os.cpu_count() or 1)
    prefix_blocks = args.prefix // BLOCK
    own_blocks = -(-args.suffix // BLOCK)
    sizes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    num_blocks = prefix_blocks + own_blocks * max(sizes) + 1
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, DIM)
    v_cache = torch.randn(num_blocks * BLOCK, kv_heads, DIM)
    store = None if args.gather_prefix else PrefixKVStore(1, 2 * kv_heads * DIM * 4, 1 << 30)
    prefix = list(range(prefix_blocks))
    print(f"prefix {args.prefix} tokens, suffix {args.suffix}, threads {torch.get_num_threads()}")
    print("members  plain_ms  cascade_ms  speedup")
    threshold = None
    for n in sizes:
        chunks = []
        for i in range(n):
            own = [prefix_blocks + i * own_blocks + b for b in range(own_blocks)]
            start = args.prefix + args.suffix - 1
            chunks.append(ScheduledChunk(f"m{i}", [0], start, prefix + own, True, 1, 0, args.prefix))
        plain = [ScheduledChunk(c.request_id, c.token_ids, c.start_position, c.block_table, True, 1) for c in chunks]
        _, _, _, plain_meta = build_step_inputs(StepLayout(plain, []), BLOCK)
        _, _, _, cascade_meta = build_step_inputs(layout_step(chunks, min_queries=1, min_decodes=1), BLOCK, store)
        q = torch.randn(n, heads, DIM)
        plain_s = time_call(lambda: paged_attention(q, k_cache, v_cache, plain_meta, 0.125), args.repeats)
        cascade_s = time_call(lambda: paged_attention(q, k_cache, v_cache, cascade_meta, 0.125), args.repeats)
        if threshold is None and cascade_s < plain_s:
            threshold = n
        print(f"{n:7d}  {plain_s * 1e3:8.3f}  {cascade_s * 1e3:10.3f}  {plain_s / cascade_s:7.2f}")
    print(f"cascade faster from {threshold} members on")


if __name__ == "__main__":
    main()
