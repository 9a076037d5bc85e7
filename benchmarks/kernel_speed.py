"""The step's kernels alone, per call: projections by kernel and batch size, decode attention.

    .venv/bin/python benchmarks/kernel_speed.py [--dtype bfloat16] [--model-shape llama-1b]
        [--part gemm|decode|tiles|all]

Projections: each of the model's weight shapes (qkv, o, gate/up, down, the vocabulary head) at
1 / 16 / 64 / 256 / 512 rows through each kernel layers/linear.py can run (treebatch's own GEMM,
kernels/gemm.c, with its pair path where the CPU has AVX512-BF16; oneDNN on the packed weight;
torch's GEMM on the plain weight): milliseconds (best of the rounds, the kernels timed in
alternation) and GFLOP/s. Decode attention: the C kernel reading the paged cache in place, for
S sequences x L keys, blocks scattered over eight layers' worth of cache (so a call does not find
the previous call's blocks in cache), milliseconds per layer call. Tiles (bfloat16 on
AVX512-BF16): the kernels that read keys in tiles of sixteen (kernels/bf16_tile.h) at the
shapes of docqa's groups: a group's decodes over its kept prefix tiles and their own keys
(cascade), a prefill chunk over a kept prefix (every key visible) and a causal chunk at the end
of its context: milliseconds per layer call and GFLOP/s of the scores and weighted values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from shapes import SHAPES  # noqa: E402

from treebatch.layers import native  # noqa: E402
from treebatch.layers.linear import ALL_ROWS, Linear  # noqa: E402

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152, "num_hidden_layers": 30}


def best_ms(function, rounds: int, calls: int) -> float:
    function()
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - began) / calls)
    return best * 1e3


def gemm_table(config: dict, dtype: torch.dtype, rounds: int) -> None:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate/up": (2 * i, h), "down": (h, i), "head": (v, h)}
    kernels = {"own": {"native_max_rows": ALL_ROWS}, "oneDNN packed": {"packed_max_rows": ALL_ROWS},
               "torch plain": {"pack": False}}
    own_name = "own (pairs)" if dtype == torch.bfloat16 and native.gemm_pairs_available() else "own"
    print(f"\nprojections, {dtype}, ms per call (GFLOP/s); own kernel: {own_name}")
    print(f"| projection | rows | {' | '.join(kernels)} |")
    print("|---|---:|" + "---:|" * len(kernels))
    generator = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in shapes.items():
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
        linears = {k: Linear(weight, **options) for k, options in kernels.items()
                   if k != "own" or native.gemm_available()}
        for rows in (1, 16, 64, 256, 512):
            if name == "head" and rows > 64:
                continue
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            calls = max(1, int(2e8 / (2 * rows * in_features * out_features)))
            times = {k: [] for k in linears}
            for _ in range(rounds):  # alternate, so a slow moment hits every kernel alike
                for k, linear in linears.items():
                    times[k].append(best_ms(lambda: linear(x), 1, calls))
            flops = 2 * rows * in_features * out_features
            cells = [f"{min(times[k]):.3f} ({flops / min(times[k]) / 1e6:.0f})" if k in times else "-"
                     for k in kernels]
            print(f"| {name} {in_features}->{out_features} | {rows} | {' | '.join(cells)} |")


def decode_table(config: dict, dtype: torch.dtype, rounds: int) -> None:
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    block, layers = 16, 8
    print(f"\ndecode attention, {dtype}, {heads} heads over {kv_heads}, ms per layer call")
    print("| sequences | keys | ms | GB/s of KV read |")
    print("|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(1)
    for seqs, keys in ((16, 256), (16, 1024), (64, 512)):
        blocks_each = keys // block
        num_blocks = seqs * blocks_each * layers
        k = torch.randn(num_blocks * block, kv_heads, dim, generator=generator).to(dtype)
        v = torch.randn(num_blocks * block, kv_heads, dim, generator=generator).to(dtype)
        order = torch.randperm(num_blocks, generator=generator)
        tables = [order[layer * seqs * blocks_each:(layer + 1) * seqs * blocks_each].view(seqs, blocks_each)
                  for layer in range(layers)]
        q = torch.randn(seqs, heads, dim, generator=generator).to(dtype)
        lengths = torch.full((seqs,), keys, dtype=torch.int64)
        turn = [0]

        def call():
            turn[0] = (turn[0] + 1) % layers
            native.paged_decode_attention(q, k, v, tables[turn[0]], lengths, block, dim**-0.5)

        ms = min(best_ms(call, 1, 40) for _ in range(rounds))
        read = 2 * seqs * keys * kv_heads * dim * k.element_size()
        print(f"| {seqs} | {keys} | {ms:.3f} | {read / ms / 1e6:.1f} |")


def tiles_table(config: dict, rounds: int) -> None:
    if not native.chunk_attention_available():
        print("\ntile kernels: not built here (no AVX512-BF16)")
        return
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    block, dtype = 16, torch.bfloat16
    generator = torch.Generator().manual_seed(2)
    slots = 4096 * block
    k = torch.randn(slots, kv_heads, dim, generator=generator).to(dtype)
    v = torch.randn(slots, kv_heads, dim, generator=generator).to(dtype)
    order = torch.randperm(slots // block, generator=generator)
    scale = dim**-0.5
    print(f"\ntile kernels, bfloat16, {heads} heads over {kv_heads}, ms per layer call (GFLOP/s)")
    print("| kernel | queries | keys | ms | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")

    def report(name: str, queries: int, keys: str, pairs: int, call) -> None:
        ms = min(best_ms(call, 1, 20) for _ in range(rounds))
        flops = 4 * pairs * heads * dim  # a score and a weighted value per (query head, key) pair
        print(f"| {name} | {queries} | {keys} | {ms:.3f} | {flops / ms / 1e6:.0f} |")

    prefix_len, own, members = 608, 48, 16
    prefix = order[: prefix_len // block]
    tiles = native.lay_out_tiles(k, v, prefix, prefix_len, block)
    own_tables = order[prefix_len // block:prefix_len // block + members * own // block].view(members, own // block)
    q = torch.randn(members, heads, dim, generator=generator).to(dtype)
    lengths = torch.full((members,), own, dtype=torch.int64)
    report("cascade decode", members, f"{prefix_len} + {own}", members * (prefix_len + own),
           lambda: native.cascade_decode_attention(q, k, v, prefix, own_tables, lengths, block, scale,
                                                   prefix_tiles=tiles))
    n = 256
    q = torch.randn(n, heads, dim, generator=generator).to(dtype)
    report("chunk over kept prefix", n, f"{prefix_len}", n * prefix_len,
           lambda: native.chunk_attention(q, k, v, prefix, prefix_len, prefix_len, block, scale, tiles=tiles))
    context = 512
    blocks = order[:context // block]
    report("causal chunk", n, f"{context} (last {n} new)", n * (context - n) + n * (n + 1) // 2,
           lambda: native.chunk_attention(q, k, v, blocks, context, context - n + 1, block, scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--part", default="all", choices=["all", "gemm", "decode", "tiles"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = SHAPES[args.model_shape] if args.model_shape else SMOLLM2
    dtype = getattr(torch, args.dtype)
    print(f"{args.model_shape or 'smollm2-135m'}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        if args.part in ("all", "gemm"):
            gemm_table(config, dtype, args.rounds)
        if args.part in ("all", "decode"):
            decode_table(config, dtype, args.rounds)
        if args.part in ("all", "tiles"):
            tiles_table(config, args.rounds)


if __name__ == "__main__":
    main()
