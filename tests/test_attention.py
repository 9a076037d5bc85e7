"""Paged attention equals plain causal attention over each sequence's own keys."""

from __future__ import annotations

import math

import pytest
import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.layers.attention import LayerAttention, paged_attention
from treebatch.core.step_layout import StepLayout, layout_step
from treebatch.runtime.step_inputs import build_step_inputs

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 8


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """q: [n, H, D] at positions start..; k, v: [start + n, KV, D]; explicit softmax per head
    (over the last `window` keys; scores soft-capped by `softcap`)."""
    group = HEADS // KV_HEADS
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        first = max(0, start + i + 1 - window) if window else 0
        for h in range(HEADS):
            keys = k[first : start + i + 1, h // group]
            scores = keys @ q[i, h] / math.sqrt(DIM)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[i, h] = scores.softmax(0) @ v[first : start + i + 1, h // group]
    return out


# Plain; windows that cut the prefix of the group test below partly (3) or wholly (1) for every
# query; a window with soft-capped scores.
ATTENTIONS = [LayerAttention(DIM**-0.5), LayerAttention(DIM**-0.5, window=3), LayerAttention(DIM**-0.5, window=1),
              LayerAttention(DIM**-0.5, window=5, softcap=0.8)]
ATTENTION_IDS = ["plain", "window3", "window1", "window5-softcap"]


@pytest.mark.parametrize("attn", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("native_decode", [True, False])
def test_decodes_and_chunks_match_reference(native_decode: bool, attn: LayerAttention):
    torch.manual_seed(0)
    num_blocks = 32
    k_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    v_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    # (start position, new tokens, block table): two decodes with ragged contexts, a fresh
    # prompt, and a later chunk of a prompt whose context ends mid-block.
    layout = [(6, 1, [3, 9]), (12, 1, [1, 2, 5, 7]), (0, 7, [11, 12]), (5, 6, [20, 4, 30])]
    chunks = [
        ScheduledChunk(f"r{i}", [0] * n, start, table, needs_sample=True, num_output_tokens=1)
        for i, (start, n, table) in enumerate(layout)
    ]
    _, _, slot_mapping, metadata = build_step_inputs(StepLayout(chunks[:2], chunks[2:]), BLOCK)
    metadata.native_decode = native_decode  # the C kernel, or gathered blocks + torch's kernel
    q = torch.randn(slot_mapping.numel(), HEADS, DIM)
    out = paged_attention(q, k_cache, v_cache, metadata, attn)

    row = 0
    for start, n, table in layout:
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start + n)]
        expected = reference(q[row : row + n], k_cache[slots], v_cache[slots], start, attn.window, attn.softcap)
        torch.testing.assert_close(out[row : row + n], expected, atol=1e-5, rtol=1e-5)
        row += n
    # The step's own tokens are written at the slots of their positions.
    expected_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for start, n, table in layout for p in range(start, start + n)]
    assert slot_mapping.tolist() == expected_slots


def _rows_by_request(chunks_in_order):
    rows, row = {}, 0
    for chunk in chunks_in_order:
        rows[chunk.request_id] = slice(row, row + chunk.num_tokens)
        row += chunk.num_tokens
    return rows


@pytest.mark.parametrize("attn", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("native_decode", [True, False])
def test_shared_prefix_attention_equals_plain_paged_attention(native_decode: bool, attn: LayerAttention):
    """Ragged group: decodes with different suffix lengths and prefill chunks of several sizes,
    all continuing one 8-token (2-block) shared prefix; plus a plain request beside them."""
    torch.manual_seed(1)
    num_blocks = 40
    k_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    v_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    prefix = [7, 3]
    layout = [  # (request, start, new tokens, own blocks)
        ("d1", 9, 1, [10]),
        ("d2", 14, 1, [11, 12]),
        ("c1", 8, 5, [13, 14]),
        ("c2", 10, 3, [15, 16]),
        ("c3", 11, 1, [17]),  # a one-token prefill tail: attends like a decode
    ]
    chunks = [
        ScheduledChunk(r, [0] * n, start, prefix + own, True, 1, group_id=0, num_shared_tokens=8)
        for r, start, n, own in layout
    ]
    chunks.append(ScheduledChunk("plain", [0] * 3, 4, [20, 21], True, 1))

    plain_chunks = [
        ScheduledChunk(c.request_id, c.token_ids, c.start_position, c.block_table, True, 1) for c in chunks
    ]
    plain_decodes = [c for c in plain_chunks if c.num_tokens == 1]
    plain_prefills = [c for c in plain_chunks if c.num_tokens > 1]
    _, _, plain_slots, plain_meta = build_step_inputs(StepLayout(plain_decodes, plain_prefills), BLOCK)
    q_plain = torch.randn(plain_slots.numel(), HEADS, DIM)
    expected = paged_attention(q_plain, k_cache, v_cache, plain_meta, attn)
    plain_rows = _rows_by_request(plain_decodes + plain_prefills)

    layout = layout_step(chunks, min_queries=2, min_decodes=1)
    assert len(layout.cascades) == 1 and [c.request_id for c in layout.decodes + layout.prefills] == ["plain"]
    _, _, slots, meta = build_step_inputs(layout, BLOCK)
    plain_meta.native_decode = meta.native_decode = native_decode
    order = layout.ordered
    rows = _rows_by_request(order)
    q = torch.empty_like(q_plain)
    for chunk in order:  # the same queries, in the cascade layout
        q[rows[chunk.request_id]] = q_plain[plain_rows[chunk.request_id]]
    out = paged_attention(q, k_cache, v_cache, meta, attn)
    if attn.window == 1:  # every query's window starts after the prefix: its product is skipped
        assert meta.cascades[0].masks[1] == "skip"
    assert sorted(slots.tolist()) == sorted(plain_slots.tolist())
    for chunk in order:
        torch.testing.assert_close(
            out[rows[chunk.request_id]], expected[plain_rows[chunk.request_id]], atol=1e-4, rtol=1e-4
        )


def test_nested_groups_hand_small_subgroups_up_to_the_enclosing_prefix():
    """Group 0 shares 8 tokens; subgroups 1 and 2 continue it to 12 shared tokens each. With
    four queries needed, subgroup 2 (4 queries) reads its own 12-token prefix once, subgroup 1
    (2 queries) hands its decodes up to group 0, which reads 8 tokens once for them and its own
    member. Every row equals plain paged attention."""
    torch.manual_seed(3)
    num_blocks = 40
    k_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    v_cache = torch.randn(num_blocks * BLOCK, KV_HEADS, DIM)
    layout = [  # (request, group, shared tokens, enclosing, start, new tokens, blocks)
        ("a1", 1, 12, ((0, 8),), 13, 1, [7, 3, 5, 10]),
        ("a2", 1, 12, ((0, 8),), 14, 1, [7, 3, 5, 11]),
        ("b1", 2, 12, ((0, 8),), 12, 3, [7, 3, 6, 12]),
        ("b2", 2, 12, ((0, 8),), 15, 1, [7, 3, 6, 13]),
        ("m", 0, 8, (), 8, 2, [7, 3, 14]),
    ]
    chunks = [
        ScheduledChunk(r, [0] * n, start, blocks, True, 1, group_id=g, num_shared_tokens=sh, enclosing=enc)
        for r, g, sh, enc, start, n, blocks in layout
    ]
    layout = layout_step(chunks, min_queries=4, min_decodes=1)
    assert layout.decodes == layout.prefills == []
    assert [(c.shared, sorted(m.request_id for m in c.members)) for c in layout.cascades] == [
        (12, ["b1", "b2"]),
        (8, ["a1", "a2", "m"]),
    ]
    plain = [ScheduledChunk(c.request_id, c.token_ids, c.start_position, c.block_table, True, 1) for c in chunks]
    plain_decodes = [c for c in plain if c.num_tokens == 1]
    plain_prefills = [c for c in plain if c.num_tokens > 1]
    # What the cost model prices: each group's 4 queries against its prefix as one product
    # (4 * 12 + 4 * 8 many-query pairs), the decodes' own keys singly (b2: 3, a1: 5, a2: 6).
    assert layout.context_pairs() == (3 + 5 + 6, 4 * 12 + 4 * 8)
    assert layout.num_prefill_chunks == 2  # b1 and m; the rest are single queries
    assert StepLayout(plain_decodes, plain_prefills).context_pairs() == (13 + 14 + 15, 3 * 12 + 2 * 8)
    _, _, plain_slots, plain_meta = build_step_inputs(StepLayout(plain_decodes, plain_prefills), BLOCK)
    q_plain = torch.randn(plain_slots.numel(), HEADS, DIM)
    expected = paged_attention(q_plain, k_cache, v_cache, plain_meta, DIM**-0.5)
    plain_rows = _rows_by_request(plain_decodes + plain_prefills)

    _, _, slots, meta = build_step_inputs(layout, BLOCK)
    order = layout.ordered
    rows = _rows_by_request(order)
    q = torch.empty_like(q_plain)
    for chunk in order:
        q[rows[chunk.request_id]] = q_plain[plain_rows[chunk.request_id]]
    out = paged_attention(q, k_cache, v_cache, meta, DIM**-0.5)
    assert sorted(slots.tolist()) == sorted(plain_slots.tolist())
    for chunk in order:
        torch.testing.assert_close(
            out[rows[chunk.request_id]], expected[plain_rows[chunk.request_id]], atol=1e-4, rtol=1e-4
        )


def test_a_group_with_few_decodes_sends_them_to_the_plain_path():
    chunks = [
        ScheduledChunk("d1", [0], 9, [7, 3, 10], True, 1, group_id=0, num_shared_tokens=8),
        ScheduledChunk("d2", [0], 10, [7, 3, 11], True, 1, group_id=0, num_shared_tokens=8),
        ScheduledChunk("c1", [0] * 3, 8, [7, 3, 12], True, 1, group_id=0, num_shared_tokens=8),
    ]
    layout = layout_step(chunks, min_queries=2, min_decodes=3)
    assert [c.request_id for c in layout.decodes] == ["d1", "d2"]
    assert [(c.group, c.shared, [m.request_id for m in c.members]) for c in layout.cascades] == [(0, 8, ["c1"])]
    layout = layout_step(chunks, min_queries=2, min_decodes=2)
    assert layout.decodes == [] and [c.request_id for c in layout.cascades[0].members] == ["d1", "d2", "c1"]


def test_fused_attention_with_lse_equals_reference():
    from treebatch.layers.attention import attention_with_lse, attention_with_lse_reference, merge_attention

    torch.manual_seed(2)
    q, k, v = torch.randn(5, 3, 7, DIM), torch.randn(5, 3, 11, DIM), torch.randn(5, 3, 11, DIM)
    mask = torch.rand(5, 1, 7, 11) > 0.4
    mask[..., 0] = True
    for m in (None, mask):
        out, lse = attention_with_lse(q, k, v, 0.3, m)
        ref_out, ref_lse = attention_with_lse_reference(q, k, v, 0.3, m)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # Splitting the keys in two and merging by log-sum-exp equals attending to all of them.
    a = attention_with_lse(q, k[:, :, :4], v[:, :, :4], 0.3)
    b = attention_with_lse(q, k[:, :, 4:], v[:, :, 4:], 0.3)
    torch.testing.assert_close(merge_attention(*a, *b), attention_with_lse(q, k, v, 0.3)[0], atol=1e-5, rtol=1e-5)
