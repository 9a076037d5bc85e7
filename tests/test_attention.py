"""Paged attention equals plain causal attention over each sequence's own keys."""

from __future__ import annotations

import math

import numpy as np
import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.runtime.attention import paged_attention
from treebatch.runtime.model_runner import ModelRunner

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q: [n, H, D] at positions start..; k, v: [start + n, KV, D]; explicit softmax per head."""
    group = HEADS // KV_HEADS
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        for h in range(HEADS):
            keys = k[: start + i + 1, h // group]
            weights = (keys @ q[i, h] / math.sqrt(DIM)).softmax(0)
            out[i, h] = weights @ v[: start + i + 1, h // group]
    return out


def test_decodes_and_chunks_match_reference():
    torch.manual_seed(0)
    num_blocks = 32
    k_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    v_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    runner = ModelRunner.__new__(ModelRunner)  # only its input preparation is exercised
    runner.block_size = BLOCK
    runner._offsets = np.arange(BLOCK)
    # (start position, new tokens, block table): two decodes with ragged contexts, a fresh
    # prompt, and a later chunk of a prompt whose context ends mid-block.
    layout = [(6, 1, [3, 9]), (12, 1, [1, 2, 5, 7]), (0, 7, [11, 12]), (5, 6, [20, 4, 30])]
    chunks = [
        ScheduledChunk(f"r{i}", [0] * n, start, table, needs_sample=True, num_output_tokens=1)
        for i, (start, n, table) in enumerate(layout)
    ]
    _, _, slot_mapping, metadata = runner._prepare(chunks[:2], chunks[2:])
    q = torch.randn(slot_mapping.numel(), HEADS, DIM)
    out = paged_attention(q, k_cache, v_cache, metadata, DIM**-0.5)

    row = 0
    for start, n, table in layout:
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start + n)]
        expected = reference(q[row : row + n], k_cache[slots], v_cache[slots], start)
        torch.testing.assert_close(out[row : row + n], expected, atol=1e-5, rtol=1e-5)
        row += n
    # The step's own tokens are written at the slots of their positions.
    expected_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for start, n, table in layout for p in range(start, start + n)]
    assert slot_mapping.tolist() == expected_slots
