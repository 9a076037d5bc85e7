"""kernels/chunk_attention.c: a prefill chunk's attention read in place, in bfloat16 and in
float32, equals the explicit softmax over the same keys and values, and the model's attention
paths give the same rows with it as through torch's kernels."""

from __future__ import annotations

import pytest
import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.core.step_layout import StepLayout, layout_step
from treebatch.layers import native
from treebatch.layers.attention import LayerAttention, paged_attention
from treebatch.runtime.prefix_store import PrefixKVStore
from treebatch.runtime.step_inputs import build_step_inputs

DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not native.chunk_attention_available(torch.bfloat16),
                                                          reason="needs AVX512-BF16")),
    pytest.param(torch.float32, marks=pytest.mark.skipif(not native.chunk_attention_available(torch.float32),
                                                         reason="needs AVX-512")),
]

# Tolerances (atol, rtol). bfloat16: the kernel rounds each softmax weight to bfloat16 before it
# multiplies the values (as torch's CPU flash attention does in bfloat16) and the output once;
# outputs are weighted means of values of size ~1, so a few bfloat16 ulps of 1 (2^-8 each).
# float32: sums in another order and an exponential within 2e-7 of libm's, a few float32 ulps.
TOLERANCE = {torch.bfloat16: (3e-2, 2e-2), torch.float32: (2e-5, 1e-5)}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def explicit(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, scale: float):
    """float32 softmax attention of q [n, H, D] over keys/values [L, KVH, D], row i over its
    first seen[i] keys -> (out [n, H, D], lse [n, H])."""
    n, heads, _ = q.shape
    group = heads // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("nhd,hld->hnl", q.float(), k) * scale
    mask = torch.arange(keys.shape[0])[None, :] < seen[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("hnl,hld->nhd", torch.softmax(scores, -1), v)
    return out, lse.transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("n,length,causal", [(1, 1, True), (17, 17, True), (70, 93, True), (5, 40, False), (30, 33, False)])
def test_equals_the_explicit_softmax(dtype, heads, kv_heads, dim, block_size, n, length, causal, matrix_unit):
    torch.manual_seed(n * 7 + length)
    num_blocks = 64
    k = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    v = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    blocks = torch.randperm(num_blocks)[: -(-length // block_size)]
    q = (torch.randn(n, heads, dim) * 0.5).to(dtype)
    base = length - n + 1 if causal else length
    out, lse = native.chunk_attention(q, k, v, blocks, length, base, block_size, dim**-0.5)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:length]
    seen = torch.clamp(base + torch.arange(n), max=length)
    expected, expected_lse = explicit(q, k[slots], v[slots], seen, dim**-0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    close(out, expected, dtype)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_refuses_what_it_does_not_take(dtype):
    k = torch.zeros(32, 2, 48, dtype=dtype)  # a head size not a multiple of 32
    q = torch.zeros(3, 4, 48, dtype=dtype)
    assert native.chunk_attention(q, k, k, torch.tensor([0]), 3, 1, 16, 0.1) is None
    other = torch.zeros(32, 2, 64, dtype=torch.float32 if dtype == torch.bfloat16 else torch.bfloat16)
    q = torch.zeros(3, 4, 64, dtype=dtype)
    assert native.chunk_attention(q, other, other, torch.tensor([0]), 3, 1, 16, 0.1) is None  # q and cache differ


BLOCK, HEADS, KV_HEADS, DIM = 16, 9, 3, 64


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_tiles_are_read_as_the_cache_itself(dtype):
    """A prefix laid out once (lay_out_tiles) gives the kernels' results bit for bit."""
    torch.manual_seed(4)
    k = torch.randn(40 * 16, 3, 64).to(dtype)
    v = torch.randn(40 * 16, 3, 64).to(dtype)
    blocks = torch.tensor([9, 2, 31, 17])
    tiles = native.lay_out_tiles(k, v, blocks, 64, 16)
    size = k.element_size()
    assert tiles.shape[:2] == (3, 4) and tiles.element_size() * tiles.numel() == 2 * 64 * 3 * 64 * size
    q = torch.randn(23, 9, 64).to(dtype)
    plain = native.chunk_attention(q, k, v, blocks, 64, 64, 16, 0.125)
    kept = native.chunk_attention(q, k, v, blocks, 64, 64, 16, 0.125, tiles)
    assert torch.equal(plain[0], kept[0]) and torch.equal(plain[1], kept[1])
    tables, lengths = torch.tensor([[5, 6], [7, 8]]), torch.tensor([3, 20])
    plain = native.cascade_decode_attention(q[:2], k, v, blocks, tables, lengths, 16, 0.125)
    kept = native.cascade_decode_attention(q[:2], k, v, blocks, tables, lengths, 16, 0.125, prefix_tiles=tiles)
    assert torch.equal(plain[0], kept[0]) and torch.equal(plain[1], kept[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kept", [False, True])
def test_chunks_of_a_step_in_one_call_see_their_prefix_first(dtype, kept: bool, matrix_unit):
    """chunk_attention_parts: a plain chunk and members' chunks of two groups (prefixes of 80 and
    16 keys, kept as tiles or laid out by the kernel; chunks of 1 to 45 queries, several tiles of
    queries where longer than 21), written at their rows of one output: each row equals the
    explicit softmax over its prefix and its own keys, and rows no part names stay untouched.
    In bfloat16 with the AMX matrix unit off and on (float32 never uses it)."""
    torch.manual_seed(8)
    k = torch.randn(64 * BLOCK, KV_HEADS, DIM).to(dtype)
    v = torch.randn(64 * BLOCK, KV_HEADS, DIM).to(dtype)
    order = iter(torch.randperm(64).tolist())

    def blocks(count: int) -> torch.Tensor:
        return torch.tensor([next(order) for _ in range(count)])

    prefixes = [blocks(5), blocks(1)]
    q = (torch.randn(120, HEADS, DIM) * 0.5).to(dtype)
    parts, row = [], 2  # rows 0 and 1: no part's
    for prefix, (n, length) in [(None, (30, 40)), (prefixes[0], (45, 45)), (prefixes[0], (1, 20)),
                                (prefixes[1], (12, 33)), (prefixes[1], (22, 22))]:
        prefix_len = 0 if prefix is None else prefix.numel() * BLOCK
        tiles = native.lay_out_tiles(k, v, prefix, prefix_len, BLOCK) if kept and prefix is not None else None
        parts.append(native.ChunkPart(row, n, blocks(-(-length // BLOCK)), length, length - n + 1, None, prefix,
                                      prefix_len, tiles))
        row += n
    out = torch.full_like(q, 7.0)
    assert native.chunk_attention_parts(q, k, v, parts, BLOCK, DIM**-0.5, out)
    assert torch.equal(out[:2], torch.full_like(out[:2], 7.0))

    def slots(table: torch.Tensor, length: int) -> torch.Tensor:
        return (table[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:length]

    for part in parts:
        keys = slots(part.blocks, part.length)
        if part.prefix_blocks is not None:
            keys = torch.cat([slots(part.prefix_blocks, part.prefix_len), keys])
        seen = part.prefix_len + torch.clamp(part.base + torch.arange(part.n), max=part.length)
        rows = slice(part.row, part.row + part.n)
        expected, _ = explicit(q[rows], k[keys], v[keys], seen, DIM**-0.5)
        close(out[rows], expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("store", [False, True])
def test_model_paths_equal_torch_attention(dtype, grouped: bool, store: bool):
    """Prefill chunks (plain and as a prefix group's members, with decodes beside them) through
    the kernel and through torch's attention (`native_decode` off) give the same rows."""
    torch.manual_seed(3)
    k_cache = torch.randn(80 * BLOCK, KV_HEADS, DIM).to(dtype)
    v_cache = torch.randn(80 * BLOCK, KV_HEADS, DIM).to(dtype)
    prefix = [7, 3, 30]  # 48 shared tokens
    layout = [  # (request, start, new tokens, own blocks)
        ("d1", 50, 1, [10]),
        ("d2", 70, 1, [11, 12]),
        ("c1", 48, 21, [13, 14]),
        ("c2", 52, 40, [15, 16, 17, 18]),
        ("c3", 60, 2, [19]),
    ]
    chunks = [ScheduledChunk(r, [0] * n, start, prefix + own, True, 1, group_id=0 if grouped else None,
                             num_shared_tokens=48 if grouped else 0)
              for r, start, n, own in layout]
    chunks.append(ScheduledChunk("plain", [0] * 37, 0, [40, 41, 42], True, 1))
    step = layout_step(chunks, min_queries=2, min_decodes=1)
    assert len(step.cascades) == (1 if grouped else 0)
    prefix_store = PrefixKVStore(1, 2 * KV_HEADS * DIM * 2, 1 << 20) if store else None
    _, _, slots, meta = build_step_inputs(step, BLOCK, prefix_store)
    q = torch.randn(slots.numel(), HEADS, DIM).to(dtype)
    attn = LayerAttention(DIM**-0.5)
    fast = paged_attention(q, k_cache, v_cache, meta, attn)
    if store and grouped:  # the prefix's tiles are kept, and read as they are in the next step
        assert isinstance(meta.cascades[0].prefix_kv[0], torch.Tensor)
        assert torch.equal(paged_attention(q, k_cache, v_cache, meta, attn), fast)
    _, _, _, torch_meta = build_step_inputs(step, BLOCK)
    torch_meta.native_decode = False
    slow = paged_attention(q, k_cache, v_cache, torch_meta, attn)
    close(fast, slow, dtype)
