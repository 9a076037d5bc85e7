"""The in-place decode attention kernel against the explicit softmax."""

import shutil

import pytest
import torch

from treebatch.layers import native
from treebatch.layers.attention import attention_with_lse_reference

needs_kernel = pytest.mark.skipif(native.paged_decode_kernel() is None, reason="no C compiler here")


def _reference(q, k_cache, v_cache, tables, lengths, block_size, scale, window=None, softcap=None):
    num_seqs, num_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    outs, lses = [], []
    for s in range(num_seqs):
        length = int(lengths[s])
        first = max(0, length - window) if window else 0
        slots = [int(tables[s, t // block_size]) * block_size + t % block_size for t in range(first, length)]
        keys = k_cache[slots].repeat_interleave(num_heads // kv_heads, dim=1).transpose(0, 1)  # [H, L, D]
        values = v_cache[slots].repeat_interleave(num_heads // kv_heads, dim=1).transpose(0, 1)
        out, lse = attention_with_lse_reference(q[s].unsqueeze(1), keys, values, scale, softcap=softcap)
        outs.append(out.squeeze(1))
        lses.append(lse.squeeze(1))
    return torch.stack(outs), torch.stack(lses)


@needs_kernel
@pytest.mark.parametrize(
    "num_heads,kv_heads,dim,block_size",
    [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 16), (6, 3, 40, 4), (8, 4, 256, 16), (6, 2, 64, 32), (4, 2, 64, 8),
     (48, 8, 64, 16)],  # over 32 heads: one item per (sequence, KV head) instead of per sequence
)
def test_kernel_equals_explicit_softmax(num_heads, kv_heads, dim, block_size):
    torch.manual_seed(num_heads * dim + block_size)
    num_blocks = 40
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim)
    lengths = torch.tensor([1, block_size, block_size + 1, 5 * block_size - 3, 7], dtype=torch.int64)
    width = int(-(-lengths.max() // block_size))
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lengths])  # scattered blocks
    q = torch.randn(len(lengths), num_heads, dim)
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lengths, block_size, 0.3)
    assert got is not None
    expected = _reference(q, k_cache, v_cache, tables, lengths, block_size, 0.3)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(5, None), (16, None), (21, 2.0), (None, 1.5)])
def test_sliding_window_and_softcap_equal_the_explicit_softmax(window, softcap, dtype):
    """Windows that start mid-block, on a block edge and across several blocks; soft-caps that
    bite (the scores here reach +-5). bf16 tolerance as in the test above."""
    torch.manual_seed(7)
    num_blocks, block_size, kv_heads, dim = 40, 16, 3, 64
    k_cache = (2 * torch.randn(num_blocks * block_size, kv_heads, dim)).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    lengths = torch.tensor([1, 4, 16, 17, 40, 77], dtype=torch.int64)
    tables = torch.stack([torch.randperm(num_blocks)[:5] for _ in lengths])
    q = torch.randn(len(lengths), 9, dim).to(dtype)
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lengths, block_size, 0.3, window, softcap)
    assert got is not None
    out, lse = _reference(q.float(), k_cache.float(), v_cache.float(), tables, lengths, block_size, 0.3, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got[0].float(), out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_a_sequence_without_keys_gets_zero_and_minus_infinity():
    k_cache = torch.randn(32, 2, 16)
    q = torch.randn(2, 4, 16)
    out, lse = native.paged_decode_attention(
        q, k_cache, k_cache.clone(), torch.zeros(2, 1, dtype=torch.int64), torch.tensor([0, 3]), 16, 0.25
    )
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(lse[1]).all()


@needs_kernel
@pytest.mark.parametrize("num_heads,kv_heads,dim,block_size",
                         [(9, 3, 64, 16), (8, 2, 64, 16), (4, 4, 64, 16), (4, 2, 64, 16), (8, 2, 128, 16),
                          (6, 3, 40, 4), (8, 4, 256, 16), (6, 2, 64, 32)])
def test_bf16_kernel_equals_the_float32_softmax_of_the_same_bf16_values(num_heads, kv_heads, dim, block_size):
    """The cache holds bfloat16; the kernel scores the keys exactly (products of bfloat16 values
    are exact in float32, every sum float32). Head size 64 in blocks of 16 with up to four query
    heads per KV head (kernels/bf16_decode.h) also rounds the softmax weights to bfloat16 for the
    weighted values, as torch's CPU flash attention does: a relative 2^-9 on each weight, which
    averages out over the keys. The output is rounded to bfloat16 once: a relative 2^-8 (0.4%).
    Stated as rtol 8e-3 against the float32 reference over the same (widened) values."""
    torch.manual_seed(dim + block_size)
    num_blocks = 40
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim).bfloat16()
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim).bfloat16()
    lengths = torch.tensor([1, block_size + 1, 5 * block_size - 3, 7], dtype=torch.int64)
    width = int(-(-lengths.max() // block_size))
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lengths])
    q = torch.randn(len(lengths), num_heads, dim).bfloat16()
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lengths, block_size, 0.3)
    assert got is not None and got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    out, lse = _reference(q.float(), k_cache.float(), v_cache.float(), tables, lengths, block_size, 0.3)
    torch.testing.assert_close(got[0].float(), out, atol=8e-3, rtol=8e-3)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)


def test_other_dtypes_and_the_switch_fall_back(monkeypatch):
    k_cache = torch.randn(16, 1, 8, dtype=torch.float16)
    q = torch.randn(1, 1, 8, dtype=torch.float16)
    table, lengths = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([4])
    assert native.paged_decode_attention(q, k_cache, k_cache, table, lengths, 16, 1.0) is None
    mixed = torch.randn(1, 1, 8)
    assert native.paged_decode_attention(mixed, k_cache.bfloat16(), k_cache.bfloat16(), table, lengths, 16, 1.0) is None
    monkeypatch.setenv("TREEBATCH_NATIVE", "0")
    assert native.library.__wrapped__("paged_decode") is None


def test_the_kernels_build_where_there_is_a_compiler():
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.paged_decode_kernel() is not None



needs_layer_ops = pytest.mark.skipif(native.library("layer_ops") is None, reason="no C compiler here")


@needs_layer_ops
@pytest.mark.parametrize("rows,dim", [(1, 576), (13, 64), (200, 576), (3, 37)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_equals_the_torch_ops(rows, dim, with_residual):
    """float32: the add exactly, the norm to 1e-6 (its sum of squares in another order); 200 x
    576 is past the size where the kernel goes parallel; 37 leaves a tail after 8-lane loops."""
    torch.manual_seed(rows + dim)
    hidden, residual, weight = torch.randn(rows, dim), torch.randn(rows, dim), torch.randn(dim)
    expected_hidden = hidden + residual if with_residual else hidden.clone()
    expected = torch.nn.functional.rms_norm(expected_hidden, (dim,), weight, 1e-5)
    got = native.add_rms_norm(hidden, residual if with_residual else None, weight, 1e-5)
    assert torch.equal(hidden, expected_hidden)  # the residual sum, in place
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_layer_ops
def test_add_rms_norm_in_bf16_rounds_the_sum_then_the_result_once():
    """The residual sum rounded to bf16 as torch's bf16 add rounds it (equal), the norm in float32
    from that sum and rounded once: within one bf16 ulp of the float32 norm of the same values."""
    torch.manual_seed(11)
    hidden, residual = torch.randn(20, 576).bfloat16(), torch.randn(20, 576).bfloat16()
    weight = torch.randn(576)
    expected_hidden = hidden + residual
    got = native.add_rms_norm(hidden, residual, weight, 1e-6)
    assert torch.equal(hidden, expected_hidden) and got.dtype == torch.bfloat16
    expected = torch.nn.functional.rms_norm(expected_hidden.float(), (576,), weight, 1e-6)
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-5)


@needs_layer_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 1536), (16, 1536), (70, 1000), (2, 13)])
def test_silu_mul_equals_the_torch_ops(dtype, rows, dim):
    """exp by a degree-6 polynomial (relative error under 2e-7) over gates of +-20: float32 to
    1e-6; bf16 rounded once from float32, against torch's float32 of the same values: one ulp."""
    torch.manual_seed(rows * dim)
    gate_up = (torch.randn(rows, 2 * dim) * 5).clamp(-20, 20).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = native.silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == (rows, dim)
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_fused_ops_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(native, "library", lambda name: None)
    hidden, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    expected = torch.nn.functional.rms_norm(hidden + residual, (8,), weight, 1e-5)
    torch.testing.assert_close(native.add_rms_norm(hidden, residual, weight, 1e-5), expected)
    gate_up = torch.randn(3, 16)
    torch.testing.assert_close(native.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :8]) * gate_up[:, 8:])


needs_rope_cache = pytest.mark.skipif(native.library("rope_cache") is None, reason="no C compiler here")


def _rope_case(tokens, heads, kv_heads, dim, rotary, normed, dtype, seed):
    """qkv rows, rotary tables as models/rope.py makes them, distinct slots, a random cache."""
    torch.manual_seed(seed)
    positions_in_table = 512
    freqs = torch.outer(torch.arange(positions_in_table).float(), 1.0 / 10000 ** (torch.arange(0, rotary, 2) / rotary))
    cos = torch.cat((freqs, freqs), dim=-1).cos().to(dtype)
    signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim) * 2).to(dtype)
    positions = torch.randint(0, positions_in_table, (tokens,))
    slots = torch.randperm(tokens + 40)[:tokens]
    k_cache, v_cache = torch.randn(tokens + 40, kv_heads, dim).to(dtype), torch.randn(tokens + 40, kv_heads, dim).to(dtype)
    norms = (torch.rand(dim) + 0.5, torch.rand(dim) + 0.5) if normed else (None, None)
    return qkv, cos, signed_sin, positions, slots, k_cache, v_cache, norms


@needs_rope_cache
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,dim,rotary,normed",
    [(1, 9, 3, 64, 64, False), (16, 9, 3, 64, 64, False), (300, 9, 3, 64, 64, False),  # SmolLM2; 300: parallel
     (7, 4, 1, 256, 256, True), (40, 8, 2, 128, 64, True), (5, 6, 6, 96, 32, False)],  # Gemma 3; partial rotary
)
def test_rope_store_equals_the_torch_ops_in_float32(tokens, heads, kv_heads, dim, rotary, normed):
    """The rotation as torch computes it (two rounded products and their sum): queries and the
    written keys and values equal the torch path; the per-head norms to 1e-6 (their sums of
    squares in another order); every other cache slot untouched."""
    from treebatch.models.decoder import rotate_and_store

    qkv, cos, sin, positions, slots, k_cache, v_cache, (q_norm, k_norm) = _rope_case(
        tokens, heads, kv_heads, dim, rotary, normed, torch.float32, tokens + dim)
    k_torch, v_torch = k_cache.clone(), v_cache.clone()
    expected = rotate_and_store(qkv, heads, kv_heads, cos, sin, positions, slots, k_torch, v_torch, q_norm, k_norm,
                                1e-6, fused=False)
    got = native.rope_store(qkv, heads, kv_heads, cos, sin, positions, slots, k_cache, v_cache, q_norm, k_norm, 1e-6)
    assert got is not None and got.shape == (tokens, heads, dim) and got.is_contiguous()
    tolerance = 1e-6 if normed else 0.0
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(k_cache, k_torch, rtol=tolerance, atol=tolerance)
    assert torch.equal(v_cache, v_torch)


@needs_rope_cache
@pytest.mark.parametrize("normed", [False, True])
def test_rope_store_in_bf16_rounds_once_from_float32(normed):
    """bf16: each value widened exactly, the normed value rounded to bf16 as torch stores it,
    the rotation in float32 rounded once: within one bf16 ulp (relative 2^-8) of the float32
    rotation of those values, where torch's bf16 ops round the products too (a normed value
    whose rounding a different order of the sum of squares tips costs one ulp of it: atol).
    The norm weights stay float32, as transformers applies them. Values are copied exactly."""
    from treebatch.models.decoder import rotate_and_store

    tokens, heads, kv_heads, dim = 24, 9, 3, 64
    qkv, cos, sin, positions, slots, k_cache, v_cache, (q_norm, k_norm) = _rope_case(
        tokens, heads, kv_heads, dim, dim, normed, torch.bfloat16, 5 + normed)
    got = native.rope_store(qkv, heads, kv_heads, cos, sin, positions, slots, k_cache, v_cache, q_norm, k_norm, 1e-6)
    assert got is not None and got.dtype == torch.bfloat16
    widened = qkv.float()
    if normed:  # normed in float32 with the float32 weights, then held in bf16
        def normed_part(start, count, weight):
            part = widened[:, start * dim : (start + count) * dim].view(tokens, count, dim)
            return torch.nn.functional.rms_norm(part, (dim,), weight, 1e-6).bfloat16().float().view(tokens, -1)

        widened = torch.cat([normed_part(0, heads, q_norm), normed_part(heads, kv_heads, k_norm),
                             widened[:, (heads + kv_heads) * dim :]], dim=1)
    k_float, v_float = k_cache.float(), v_cache.float()
    expected = rotate_and_store(widened, heads, kv_heads, cos.float(), sin.float(), positions, slots, k_float, v_float,
                                None, None, 1e-6, fused=False)
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=2 ** -6)
    torch.testing.assert_close(k_cache.float(), k_float, rtol=2 ** -8, atol=2 ** -6)
    assert torch.equal(v_cache.float(), v_float)


def test_rope_store_falls_back_to_torch(monkeypatch):
    """Without the kernel (or for a dtype it does not take) rotate_and_store runs the torch ops."""
    from treebatch.models.decoder import rotate_and_store

    qkv, cos, sin, positions, slots, k_cache, v_cache, _ = _rope_case(3, 2, 1, 8, 8, False, torch.float32, 3)
    k_torch, v_torch = k_cache.clone(), v_cache.clone()
    expected = rotate_and_store(qkv, 2, 1, cos, sin, positions, slots, k_torch, v_torch, None, None, 1e-6, fused=False)
    assert native.rope_store(qkv.half(), 2, 1, cos.half(), sin.half(), positions, slots, k_cache.half(),
                             v_cache.half()) is None
    monkeypatch.setattr(native, "library", lambda name: None)
    got = rotate_and_store(qkv, 2, 1, cos, sin, positions, slots, k_cache, v_cache, None, None, 1e-6)
    assert torch.equal(got, expected) and torch.equal(k_cache, k_torch) and torch.equal(v_cache, v_torch)


def _cascade_reference(q, k_cache, v_cache, prefix, tables, lengths, block_size, scale, softcap=None):
    """Each member's attention over its prefix blocks and then its own, by the explicit softmax."""
    full_tables = torch.cat([prefix.expand(q.shape[0], -1), tables], dim=1)
    return _reference(q, k_cache, v_cache, full_tables, lengths + prefix.numel() * block_size, block_size, scale,
                      softcap=softcap)


@needs_kernel
@pytest.mark.parametrize(
    "members,num_heads,kv_heads,dim,block_size",
    [(1, 9, 3, 64, 16), (3, 9, 3, 64, 16), (13, 9, 3, 64, 16),  # 13 x 3 rows: runs of at most 32
     (21, 9, 3, 64, 8), (5, 32, 8, 64, 16), (40, 2, 1, 128, 16), (6, 4, 2, 256, 32), (3, 6, 2, 8, 4)],
)
def test_cascade_kernel_equals_the_softmax_over_prefix_and_own_keys(members, num_heads, kv_heads, dim, block_size):
    """Members of one group: the shared prefix blocks read once per run of members, then each
    member's own keys (of different lengths, 1 to 2 blocks and a bit), in one running softmax:
    out and lse equal the explicit softmax over prefix + own keys (float32 to 1e-5)."""
    torch.manual_seed(members * dim + block_size)
    num_blocks = 3 + 3 * members
    k_cache, v_cache = torch.randn(num_blocks * block_size, kv_heads, dim), torch.randn(num_blocks * block_size, kv_heads, dim)
    order = torch.randperm(num_blocks)
    prefix, tables = order[:3], order[3:].view(members, 3)
    lengths = torch.tensor([1 + (5 * m) % (2 * block_size + 3) for m in range(members)])
    q = torch.randn(members, num_heads, dim)
    got = native.cascade_decode_attention(q, k_cache, v_cache, prefix, tables, lengths, block_size, 0.2)
    assert got is not None
    out, lse = _cascade_reference(q, k_cache, v_cache, prefix, tables, lengths, block_size, 0.2)
    torch.testing.assert_close(got[0], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], lse, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_kernel_soft_caps_and_reads_bf16(dtype):
    """Soft-capped scores, and a bf16 cache read as it is: against the float32 softmax of the same
    bf16 values, to the bf16 output tolerance of the plain kernel's test (8e-3)."""
    torch.manual_seed(9)
    members, num_heads, kv_heads, dim, block_size = 7, 9, 3, 64, 16
    k_cache = torch.randn(40 * block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(40 * block_size, kv_heads, dim).to(dtype)
    prefix, tables = torch.tensor([30, 4, 17]), torch.arange(7 * 2).view(7, 2) + 5
    lengths = torch.tensor([1, 5, 16, 17, 20, 31, 32])
    q = torch.randn(members, num_heads, dim).to(dtype)
    got = native.cascade_decode_attention(q, k_cache, v_cache, prefix, tables, lengths, block_size, 0.3, softcap=2.5)
    assert got is not None and got[0].dtype == dtype
    out, lse = _cascade_reference(q.float(), k_cache.float(), v_cache.float(), prefix, tables, lengths, block_size, 0.3,
                                  softcap=2.5)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got[0].float(), out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("members,num_heads,kv_heads,dim,block_size",
                         [(13, 9, 3, 64, 16), (21, 9, 3, 64, 8), (5, 32, 8, 64, 16), (40, 2, 1, 128, 16),
                          (6, 4, 2, 256, 32)])
def test_cascade_kernel_in_bf16_equals_the_softmax(members, num_heads, kv_heads, dim, block_size, matrix_unit):
    """bfloat16 without soft-capping: on AVX512-BF16 the prefix goes in tiles of sixteen keys by
    bf16 dot products (bf16_tile.h), or where the CPU has AMX and it is on, by the matrix unit
    (amx_tile.h), its softmax weights rounded to bfloat16 before they take the
    values (as torch's CPU flash attention rounds them), and with head size 64 in blocks of 16 so
    do each member's own keys (bf16_decode.h): against the float32 softmax of the same bf16
    values, to a few bfloat16 ulps of the outputs (~1)."""
    torch.manual_seed(members + dim)
    num_blocks = 3 + 3 * members
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim).bfloat16()
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim).bfloat16()
    order = torch.randperm(num_blocks)
    prefix, tables = order[:3], order[3:].view(members, 3)
    lengths = torch.tensor([1 + (5 * m) % (2 * block_size + 3) for m in range(members)])
    q = (torch.randn(members, num_heads, dim) * 0.5).bfloat16()
    got = native.cascade_decode_attention(q, k_cache, v_cache, prefix, tables, lengths, block_size, dim**-0.5)
    assert got is not None and got[0].dtype == torch.bfloat16
    out, lse = _cascade_reference(q.float(), k_cache.float(), v_cache.float(), prefix, tables, lengths, block_size,
                                  dim**-0.5)
    torch.testing.assert_close(got[0].float(), out, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_groups_in_one_call_equal_each_group_alone(dtype):
    """Several groups (prefixes of 1, 5 and 9 blocks: spans of 64 keys, whole and cut; 1 to 12
    members) in one cascade_decode_groups call: each group's rows equal what a call for that
    group alone gives, bit for bit (a row's arithmetic does not depend on the rows beside it),
    and the explicit softmax (float32 to 1e-5; bfloat16 as the one-group test)."""
    torch.manual_seed(21)
    num_heads, kv_heads, dim, block_size = 9, 3, 64, 16
    k_cache = torch.randn(80 * block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(80 * block_size, kv_heads, dim).to(dtype)
    order = iter(torch.randperm(80).tolist())
    groups, queries = [], []
    for prefix_blocks, members in ((5, 4), (1, 12), (9, 1)):
        prefix = torch.tensor([next(order) for _ in range(prefix_blocks)])
        tables = torch.tensor([[next(order) for _ in range(2)] for _ in range(members)])
        lengths = torch.tensor([1 + (7 * m) % (2 * block_size) for m in range(members)])
        tiles = native.lay_out_tiles(k_cache, v_cache, prefix, prefix_blocks * block_size, block_size)
        groups.append(native.CascadeDecode(prefix, tables, lengths, tiles))
        queries.append((torch.randn(members, num_heads, dim) * 0.5).to(dtype))
    got = native.cascade_decode_groups(torch.cat(queries), k_cache, v_cache, groups, block_size, dim**-0.5)
    assert got is not None
    row = 0
    for group, q in zip(groups, queries):
        alone = native.cascade_decode_attention(q, k_cache, v_cache, *group[:3], block_size, dim**-0.5,
                                                prefix_tiles=group.prefix_tiles)
        rows = slice(row, row + q.shape[0])
        assert torch.equal(got[0][rows], alone[0]) and torch.equal(got[1][rows], alone[1])
        out, lse = _cascade_reference(q.float(), k_cache.float(), v_cache.float(), *group[:3], block_size, dim**-0.5)
        tolerance = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 2e-2)
        torch.testing.assert_close(got[0][rows].float(), out, atol=tolerance[0], rtol=tolerance[1])
        torch.testing.assert_close(got[1][rows], lse, atol=1e-4, rtol=1e-5)
        row += q.shape[0]
    # The same groups at rows of their own in a step's q (other rows between them), written into
    # the step's output in place: equal bit for bit, and every other row untouched.
    step_q = torch.randn(40, num_heads, dim).to(dtype)
    first_rows, row = [2, 10, 30], 0
    for first, q in zip(first_rows, queries):
        step_q[first:first + q.shape[0]] = q
    out = torch.full_like(step_q, 7.0)
    table = native.KernelTable.of_groups(groups, block_size, first_rows)
    assert native.cascade_decode_table(step_q, k_cache, v_cache, table.fields, block_size, dim**-0.5, out=out)
    named = torch.zeros(40, dtype=torch.bool)
    for first, q in zip(first_rows, queries):
        assert torch.equal(out[first:first + q.shape[0]], got[0][row:row + q.shape[0]])
        named[first:first + q.shape[0]] = True
        row += q.shape[0]
    assert torch.equal(out[~named], torch.full_like(out[~named], 7.0))


@pytest.mark.parametrize("rows,n", [(1, 7), (3, 49152), (128, 1000), (5, 1)])
def test_argmax_rows_equals_torchs(rows: int, n: int) -> None:
    """The first index of each row's largest value, ties and all, and of its first NaN where it
    has one, as torch's argmax gives (rows x n past the kernel's parallel size run threaded)."""
    torch.manual_seed(rows + n)
    x = torch.randn(rows, n)
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    x = torch.randint(0, 3, (rows, n)).float()  # many ties of the largest value
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    x = torch.full((rows, n), float("-inf"))
    x[0, n // 2] = float("nan")
    if n > 2:
        x[0, n - 1] = float("nan")
        x[-1, 1] = float("inf")
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
