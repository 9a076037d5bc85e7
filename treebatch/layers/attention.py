"""Paged attention over the KV cache, plain and shared-prefix (cascade).

The KV cache of one layer is a flat array of slots, [num_slots, kv_heads, head_dim]; a sequence's
keys live in the blocks its block table names. A step's tokens come decodes first (one query per
sequence, batched into a single product with a padding mask), then prefill chunks (each a causal
block of queries against all of its sequence's keys so far), then prefix groups.

Everything that depends only on the step (block indices, masks as additive biases) is built once,
by the runner or at the first layer; per layer there remain block gathers, the attention products
and one concatenation. On a few CPU cores each extra small op costs a thread-pool round trip, and
a step pays it once per layer. Where the in-place kernels take the layer (`_in_place_step`: on
AVX-512, in float32 or, with AVX512-BF16, in bfloat16), a layer is three C calls writing into one output, whatever the number of
groups and chunks: the plain decodes, every group's decodes, every prefill chunk.

A layer may differ from plain softmax attention in two ways (`LayerAttention`): a sliding window
(a query at position p sees keys (p - window, p]: Mistral, the local layers of Gemma 2 and 3) and
soft-capped scores (Gemma 2). Every path honours both: the in-place kernel skips the blocks before
the window, a prefill chunk attends only from its window's first key, and a group whose prefix
lies wholly before every one of its queries' windows skips that layer's prefix product. The
window masks are made at the first layer that needs them and kept for the step (`masks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from treebatch.layers import native


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """One layer's attention: softmax(q k^T * scale) v, with optionally a sliding window and
    soft-capped scores."""

    scale: float
    window: int | None = None  # a query at position p sees keys at (p - window, p]
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), before the mask


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # first row of this chunk in the step's flat token batch
    num_queries: int
    context_len: int  # keys this chunk attends to: positions [0, context_len)
    context_blocks: torch.Tensor  # [ceil(context_len / block_size)] the sequence's blocks
    bias: torch.Tensor | None  # [num_queries, context_len] additive mask; None when plainly causal
    masks: dict = field(default_factory=dict)  # per sliding window: (first key, bias)


@dataclass(slots=True)
class SuffixChunk:
    """A group member's prefill chunk: its queries against its own keys after the shared prefix."""

    num_queries: int
    suffix_blocks: torch.Tensor  # the member's blocks from the end of the shared prefix on
    suffix_len: int  # keys at positions [prefix_len, prefix_len + suffix_len)
    mask: torch.Tensor  # [num_queries, suffix_len] bool (True = attend)
    folded_bias: torch.Tensor | None = None  # the mask in the GQA-folded layout, made at first use
    masks: dict = field(default_factory=dict)  # per sliding window: its folded bias


@dataclass(slots=True)
class CascadeGroup:
    """The queries of one prefix group in a step, attended as prefix (once) + own suffixes."""

    prefix_blocks: torch.Tensor  # the group's shared full blocks
    row_start: int  # the group's queries are rows [row_start, row_start + num_rows) of the step
    num_rows: int
    num_decodes: int  # its first num_decodes rows are single-query decodes, then the chunks
    decode_suffix_blocks: torch.Tensor | None  # [num_decodes * max_blocks], padded with block 0
    decode_suffix_lengths: torch.Tensor | None  # [num_decodes] suffix keys of each decode
    chunks: list[SuffixChunk] = field(default_factory=list)
    # The additive bias hiding the padding, [num_decodes, 1, 1, max_blocks * block_size]: made at
    # first use by the gathering path only (the in-place kernel reads the lengths).
    decode_suffix_bias: torch.Tensor | None = None
    # Per layer, the prefix's gathered (K, V), or for the bfloat16 kernels its tiles, kept by the
    # runner across steps (see prefix_store.py) and filled here at first use; None: every step.
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None] | None = None
    masks: dict = field(default_factory=dict)  # per sliding window: the prefix's mask, or "skip"


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each token's K and V are written
    block_size: int
    num_decodes: int = 0  # rows [0, num_decodes) are single-query decodes
    decode_blocks: torch.Tensor | None = None  # [num_decodes * max_blocks] (padded with block 0)
    decode_lengths: torch.Tensor | None = None  # [num_decodes] keys of each decode
    prefills: list[PrefillChunk] = field(default_factory=list)
    cascades: list[CascadeGroup] = field(default_factory=list)
    # As CascadeGroup.decode_suffix_bias, for the plain decodes; made at first use.
    decode_bias: torch.Tensor | None = None
    # Single-query rows read the paged cache in place with the C kernel (native.py) when it is
    # built; False, or no kernel: gather the padded blocks and use torch's fused attention.
    native_decode: bool = True
    # [T] each row's position; the window masks read it (None: no layer has a window).
    positions: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)  # per sliding window: the decodes' padding bias
    in_place: InPlacePlan | None = None  # the in-place kernels' tables for the step, made at the first layer


@dataclass(slots=True)
class InPlacePlan:
    """What the in-place kernels read at every layer of a step (_in_place_step; the groups'
    decodes also on the per-part path), made once: the groups' decode rows, and the kernels'
    tables of groups and of chunks, whose prefix tiles column each layer fills with its own."""

    decode_index: torch.Tensor  # the rows of the groups' decodes, group after group
    groups: native.KernelTable  # the groups with decodes, at their rows of the step
    grouped: list[int]  # their cascades' indices
    chunks: native.KernelTable  # the plain prefill chunks, then the groups' chunks
    chunk_cascades: list[int | None]  # each chunk's cascade's index (None: a plain chunk)

    @staticmethod
    def of(metadata: AttentionMetadata) -> InPlacePlan:
        cascades = metadata.cascades
        grouped = [i for i, c in enumerate(cascades) if c.num_decodes]
        decode_rows = [row for i in grouped for row in range(cascades[i].row_start,
                                                                cascades[i].row_start + cascades[i].num_decodes)]
        groups = [native.CascadeDecode(cascades[i].prefix_blocks,
                                       cascades[i].decode_suffix_blocks.view(cascades[i].num_decodes, -1),
                                       cascades[i].decode_suffix_lengths) for i in grouped]
        parts = [native.ChunkPart(chunk.query_start, chunk.num_queries, chunk.context_blocks, chunk.context_len,
                                  chunk.context_len - chunk.num_queries + 1) for chunk in metadata.prefills]
        chunk_cascades: list[int | None] = [None] * len(parts)
        for i, cascade in enumerate(cascades):
            row = cascade.row_start + cascade.num_decodes
            prefix_len = cascade.prefix_blocks.numel() * metadata.block_size
            for chunk in cascade.chunks:
                parts.append(native.ChunkPart(row, chunk.num_queries, chunk.suffix_blocks, chunk.suffix_len,
                                              chunk.suffix_len - chunk.num_queries + 1, None, cascade.prefix_blocks,
                                              prefix_len))
                chunk_cascades.append(i)
                row += chunk.num_queries
        return InPlacePlan(torch.tensor(decode_rows, dtype=torch.int64),
                           native.KernelTable.of_groups(groups, metadata.block_size,
                                                        [cascades[i].row_start for i in grouped]), grouped,
                           native.KernelTable.of_chunks(parts), chunk_cascades)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask (True = attend) as the bias softmax attention adds: 0 or -inf."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def causal_mask(start_position: int, num_queries: int, context_len: int) -> torch.Tensor | None:
    """Query i sits at position start+i and sees keys 0..start+i, as an additive bias. None when
    the plain causal (top-left aligned) mask of a square block already says that."""
    if start_position == 0 and num_queries == context_len:
        return None
    query_positions = torch.arange(start_position, start_position + num_queries).unsqueeze(1)
    return additive_mask(torch.arange(context_len).unsqueeze(0) <= query_positions)


def gather_blocks(cache_rows: torch.Tensor, blocks: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The slots of `blocks` in order: [blocks.numel() * block_size, kv_heads, D].

    `cache_rows` is one layer's K or V cache viewed as [num_blocks, block_size * kv_heads * D]:
    selecting whole rows copies contiguous runs, several times faster than advanced indexing of
    a 4-d view (measured 4x for a 38-block prefix)."""
    return cache_rows.index_select(0, blocks).view(-1, num_kv_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    attn: LayerAttention | float,
    layer: int = 0,
) -> torch.Tensor:
    """q: [T, heads, D] -> [T, heads, D]. Keys and values must already be written to the cache
    (`layer`: which layer's cache this is, for the prefixes kept across steps). `attn`: the
    layer's attention, or just its scale for plain softmax attention."""
    if not isinstance(attn, LayerAttention):
        attn = LayerAttention(float(attn))
    scale, window, softcap = attn.scale, attn.window, attn.softcap
    whole_step = _in_place_step(q, k_cache, v_cache, metadata, attn, layer)
    if whole_step is not None:
        return whole_step
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    k_rows = k_cache.view(-1, metadata.block_size * num_kv_heads * head_dim)
    v_rows = v_cache.view(-1, metadata.block_size * num_kv_heads * head_dim)
    parts: list[torch.Tensor] = []  # the step's rows in order: decodes, prefill chunks, groups

    num_decodes = metadata.num_decodes
    in_place = None
    if num_decodes:
        in_place = _native_decode(q[:num_decodes], k_cache, v_cache, metadata, metadata.decode_blocks, metadata.decode_lengths, attn)
    if in_place is not None:
        parts.append(in_place[0])
    elif num_decodes:
        # Grouped-query heads fold into the query dimension: [S, kv_heads, group, D].
        queries = q[:num_decodes].view(num_decodes, num_kv_heads, group, head_dim)
        keys = gather_blocks(k_rows, metadata.decode_blocks, num_kv_heads, head_dim)
        values = gather_blocks(v_rows, metadata.decode_blocks, num_kv_heads, head_dim)
        keys = keys.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)  # [S, kv_heads, L, D]
        values = values.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
        bias = _decode_bias(metadata, metadata.decode_lengths, keys.shape[2], q.dtype, window)
        if softcap:
            decoded, _ = attention_with_lse(queries, keys, values, scale, bias, softcap)
        else:
            decoded = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=scale)
        parts.append(decoded.reshape(num_decodes, num_heads, head_dim))

    for chunk in metadata.prefills:
        chunk_q = q[chunk.query_start : chunk.query_start + chunk.num_queries]
        length = chunk.context_len
        in_place = _native_chunk(chunk_q, k_cache, v_cache, metadata, chunk.context_blocks, length,
                                 length - chunk.num_queries + 1, attn)
        if in_place is not None:
            parts.append(in_place[0])
            continue
        first_key, bias = _prefill_bias(chunk, window)
        keys = gather_blocks(k_rows, chunk.context_blocks, num_kv_heads, head_dim)[first_key:length]
        values = gather_blocks(v_rows, chunk.context_blocks, num_kv_heads, head_dim)[first_key:length]
        if softcap:
            if bias is None:  # a square causal block
                bias = additive_mask(torch.ones(length, length, dtype=torch.bool).tril())
            out, _ = folded_attention_with_lse(chunk_q, keys, values, scale, _as(fold_mask(bias, group), q), softcap)
            parts.append(out)
            continue
        attended = F.scaled_dot_product_attention(
            chunk_q.transpose(0, 1).unsqueeze(0),  # [1, heads, n, D]
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=_as(bias, q),
            is_causal=bias is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        parts.append(attended.squeeze(0).transpose(0, 1))

    tiles = [_prefix_tiles(k_cache, v_cache, metadata, cascade, attn, layer) for cascade in metadata.cascades]
    decoded = _native_cascade_decodes(q, k_cache, v_cache, metadata, attn, tiles)
    wholes = [None] * len(metadata.cascades)
    if decoded is not None:
        each = iter(decoded.split([c.num_decodes for c in metadata.cascades if c.num_decodes]))
        wholes = [next(each) if c.num_decodes else None for c in metadata.cascades]
    for cascade, prefix_tiles, whole in zip(metadata.cascades, tiles, wholes):
        parts.append(_cascade_attention(q, k_cache, v_cache, metadata, cascade, attn, layer, prefix_tiles, whole))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _decode_bias(
    metadata: AttentionMetadata, lengths: torch.Tensor, width: int, dtype: torch.dtype, window: int | None,
    owner: object | None = None,
) -> torch.Tensor:
    """The padding bias of a batch of single-query rows (and their window), made once per step.
    `owner`: the CascadeGroup whose suffix decodes these are (None: the plain decodes)."""
    if window is None:
        if owner is None:
            if metadata.decode_bias is None:
                metadata.decode_bias = padding_bias(lengths, width, dtype)
            return metadata.decode_bias
        if owner.decode_suffix_bias is None:
            owner.decode_suffix_bias = padding_bias(lengths, width, dtype)
        return owner.decode_suffix_bias
    masks = (owner or metadata).masks
    key = ("decode", window)
    if key not in masks:
        masks[key] = padding_bias(lengths, width, dtype, window)
    return masks[key]


def _prefill_bias(chunk: PrefillChunk, window: int | None) -> tuple[int, torch.Tensor | None]:
    """(first key the chunk's queries can see, their additive mask over keys from there on)."""
    if window is None:
        return 0, chunk.bias
    if window not in chunk.masks:
        start = chunk.context_len - chunk.num_queries
        first_key = max(0, start - window + 1)
        key_positions = torch.arange(first_key, chunk.context_len).unsqueeze(0)
        query_positions = torch.arange(start, chunk.context_len).unsqueeze(1)
        visible = (key_positions <= query_positions) & (key_positions > query_positions - window)
        chunk.masks[window] = (first_key, additive_mask(visible))
    return chunk.masks[window]


def _native_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    padded_blocks: torch.Tensor,
    lengths: torch.Tensor | None,
    attn: LayerAttention,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Single-query rows by the in-place C kernel (into `out` where given), or None for the
    torch path."""
    if not metadata.native_decode:
        return None
    tables = padded_blocks.view(q.shape[0], -1)
    return native.paged_decode_attention(
        q, k_cache, v_cache, tables, lengths, metadata.block_size, attn.scale, attn.window, attn.softcap, out
    )


def _plain_in_place(attn: LayerAttention, metadata: AttentionMetadata) -> bool:
    """Whether the in-place kernels may take this layer's prefill rows: they have no sliding
    window or soft-capped scores (the torch path takes those)."""
    return attn.window is None and not attn.softcap and metadata.native_decode


def _native_chunk(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    blocks: torch.Tensor,
    length: int,
    base: int,
    attn: LayerAttention,
    tiles: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows q against keys [0, length) of `blocks`, row i seeing the first base + i of them, by
    the in-place C kernel (bfloat16 on AVX512-BF16; `tiles`: those keys already laid out for
    it), or None for the torch path (which also takes sliding windows and soft-capped scores)."""
    if not _plain_in_place(attn, metadata):
        return None
    return native.chunk_attention(q, k_cache, v_cache, blocks, length, base, metadata.block_size, attn.scale, tiles)


def padding_bias(lengths: torch.Tensor, width: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """[S, 1, 1, width] additive bias letting row s see its first lengths[s] keys of a padded
    batch (of those, with a sliding window, only the last `window`)."""
    keys = torch.arange(width).unsqueeze(0)
    mask = keys < lengths.unsqueeze(1)
    if window is not None:
        mask &= keys >= lengths.unsqueeze(1) - window
    return additive_mask(mask, dtype).view(len(lengths), 1, 1, width)


def _as(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return bias if bias is None or bias.dtype == q.dtype else bias.to(q.dtype)


# -- shared-prefix (cascade) attention -----------------------------------------------------------


def _cascade_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    cascade: CascadeGroup,
    attn: LayerAttention,
    layer: int,
    tiles: torch.Tensor | None,
    whole: torch.Tensor | None,
) -> torch.Tensor:
    """One group's rows: `whole` its decodes' results where the C kernel took them (then only
    its chunks are left here), `tiles` its prefix's tiles (_prefix_tiles)."""
    scale, window, softcap = attn.scale, attn.window, attn.softcap
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    k_rows = k_cache.view(-1, metadata.block_size * num_kv_heads * head_dim)
    v_rows = v_cache.view(-1, metadata.block_size * num_kv_heads * head_dim)
    queries = q[cascade.row_start : cascade.row_start + cascade.num_rows]  # [N, heads, D]
    num_decodes = cascade.num_decodes
    first = 0  # the group's rows before `queries`: its decodes, where the C kernel took them
    if whole is not None:
        if not cascade.chunks:
            return whole
        first, num_decodes = num_decodes, 0
        queries = queries[first:]
    prefix_mask = _prefix_window_mask(metadata, cascade, group, window)
    prefix_len = cascade.prefix_blocks.numel() * metadata.block_size
    in_place_prefix = _native_chunk(queries, k_cache, v_cache, metadata, cascade.prefix_blocks, prefix_len,
                                    prefix_len, attn, tiles)
    if in_place_prefix is not None:
        prefix_out, prefix_lse = in_place_prefix
    elif prefix_mask == "skip":  # the whole prefix lies before every query's window
        prefix_out = prefix_lse = None
    else:
        # All the group's queries against its prefix in one product, reading the prefix once (each
        # query sits after the prefix: no causal mask).
        prefix_k, prefix_v = _prefix_kv(k_rows, v_rows, cascade, layer, num_kv_heads, head_dim)
        prefix_out, prefix_lse = folded_attention_with_lse(queries, prefix_k, prefix_v, scale, prefix_mask, softcap)

    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    in_place = None
    if num_decodes:
        in_place = _native_decode(
            queries[:num_decodes], k_cache, v_cache, metadata, cascade.decode_suffix_blocks,
            cascade.decode_suffix_lengths, attn,
        )
    if in_place is not None:
        outs.append(in_place[0])
        lses.append(in_place[1])
    elif num_decodes:
        folded = queries[:num_decodes].view(num_decodes, num_kv_heads, group, head_dim)
        keys = gather_blocks(k_rows, cascade.decode_suffix_blocks, num_kv_heads, head_dim)
        values = gather_blocks(v_rows, cascade.decode_suffix_blocks, num_kv_heads, head_dim)
        keys = keys.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
        values = values.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
        bias = _decode_bias(metadata, cascade.decode_suffix_lengths, keys.shape[2], q.dtype, window, cascade)
        out, lse = attention_with_lse(folded, keys, values, scale, bias, softcap)
        outs.append(out.reshape(num_decodes, num_heads, head_dim))
        lses.append(lse.reshape(num_decodes, num_heads))
    row = first + num_decodes  # within the group's rows
    for chunk in cascade.chunks:
        rows = queries[row - first : row - first + chunk.num_queries]
        in_place = _native_chunk(rows, k_cache, v_cache, metadata, chunk.suffix_blocks, chunk.suffix_len,
                                 chunk.suffix_len - chunk.num_queries + 1, attn)
        if in_place is not None:
            out, lse = in_place
        else:
            bias = _suffix_bias(metadata, cascade, chunk, row, group, window, q.dtype)
            keys = gather_blocks(k_rows, chunk.suffix_blocks, num_kv_heads, head_dim)[: chunk.suffix_len]
            values = gather_blocks(v_rows, chunk.suffix_blocks, num_kv_heads, head_dim)[: chunk.suffix_len]
            out, lse = folded_attention_with_lse(rows, keys, values, scale, bias, softcap)
        outs.append(out)
        lses.append(lse)
        row += chunk.num_queries
    suffix_out = outs[0] if len(outs) == 1 else torch.cat(outs)
    suffix_lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    merged = suffix_out if prefix_out is None else merge_attention(prefix_out, prefix_lse, suffix_out, suffix_lse)
    return merged if whole is None else torch.cat([whole, merged])


def _prefix_tiles(
    k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, cascade: CascadeGroup,
    attn: LayerAttention, layer: int,
) -> torch.Tensor | None:
    """The group prefix laid out for the tile kernels (native.lay_out_tiles), kept across steps in
    the prefix store's slot for this layer like the torch path's gathered K and V, or None where
    the kernels do not read it (a window or soft-cap, no AVX-512)."""
    if not _plain_in_place(attn, metadata):
        return None
    kept = cascade.prefix_kv
    if kept is not None and isinstance(kept[layer], torch.Tensor):
        return kept[layer]
    tiles = native.lay_out_tiles(k_cache, v_cache, cascade.prefix_blocks,
                                 cascade.prefix_blocks.numel() * metadata.block_size, metadata.block_size)
    if kept is not None and tiles is not None:
        kept[layer] = tiles
    return tiles


def _native_cascade_decodes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    attn: LayerAttention,
    tiles: list[torch.Tensor | None],
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Every group's single-query rows over its prefix (read once for all of them) and their own
    keys, by one call of the C kernel for the whole step (the step's InPlacePlan table, with this
    layer's tiles), or None (no such rows, no kernel, or a sliding window: the torch cascade
    takes those). The results go to their rows of `out` (the step's output; returned), or,
    without one, come back alone, in the rows of plan.decode_index."""
    if attn.window is not None or not metadata.native_decode or not metadata.cascades:
        return None
    plan = _step_plan(metadata)
    if not plan.grouped:
        return None
    result = native.cascade_decode_table(q, k_cache, v_cache, plan.groups.with_tiles([tiles[i] for i in plan.grouped]),
                                         metadata.block_size, attn.scale, attn.softcap, out)
    if result is None:
        return None
    return out if out is not None else result[0].index_select(0, plan.decode_index)


def _step_plan(metadata: AttentionMetadata) -> InPlacePlan:
    """The step's InPlacePlan, made at the first layer that asks."""
    if metadata.in_place is None:
        metadata.in_place = InPlacePlan.of(metadata)
    return metadata.in_place


def _in_place_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    attn: LayerAttention,
    layer: int,
) -> torch.Tensor | None:
    """The whole step's rows by the in-place kernels into one output, three calls per layer: the
    plain decodes, every group's decodes, and every prefill chunk (a group member's over its
    group's prefix and its own keys in one softmax, so nothing is merged). None where they do
    not take this layer (a window or soft-cap, no AVX-512, or for bfloat16 no AVX512-BF16): the
    per-part path."""
    if not _plain_in_place(attn, metadata) or not native.chunk_attention_available(q.dtype):
        return None
    plan = _step_plan(metadata)
    q = q.contiguous()
    out = torch.empty_like(q)
    if metadata.num_decodes:
        decoded = _native_decode(q[: metadata.num_decodes], k_cache, v_cache, metadata, metadata.decode_blocks,
                                 metadata.decode_lengths, attn, out[: metadata.num_decodes])
        if decoded is None:
            return None
    tiles = [_prefix_tiles(k_cache, v_cache, metadata, cascade, attn, layer) for cascade in metadata.cascades]
    if plan.grouped and _native_cascade_decodes(q, k_cache, v_cache, metadata, attn, tiles, out) is None:
        return None
    if plan.chunk_cascades:
        fields = plan.chunks.with_tiles([None if i is None else tiles[i] for i in plan.chunk_cascades])
        if not native.chunk_attention_table(q, k_cache, v_cache, fields, metadata.block_size, attn.scale, out):
            return None
    return out


def _prefix_window_mask(
    metadata: AttentionMetadata, cascade: CascadeGroup, group: int, window: int | None
) -> torch.Tensor | str | None:
    """The group's queries' sliding-window mask over its prefix, in the folded layout (boolean,
    so that a query that sees none of the prefix is an empty part), None where every query sees
    all of it, or "skip" where none sees any of it. Made once per step and window."""
    if window is None:
        return None
    if window not in cascade.masks:
        prefix_len = cascade.prefix_blocks.numel() * metadata.block_size
        rows = metadata.positions[cascade.row_start : cascade.row_start + cascade.num_rows]
        first_visible = rows - window + 1  # each query's first key in its window
        if int(first_visible.min()) >= prefix_len:
            cascade.masks[window] = "skip"
        elif int(first_visible.max()) <= 0:
            cascade.masks[window] = None
        else:
            visible = torch.arange(prefix_len).unsqueeze(0) >= first_visible.unsqueeze(1)
            cascade.masks[window] = fold_mask(visible, group)
    return cascade.masks[window]


def _suffix_bias(
    metadata: AttentionMetadata, cascade: CascadeGroup, chunk: SuffixChunk, row: int, group: int,
    window: int | None, dtype: torch.dtype,
) -> torch.Tensor:
    """A member chunk's folded additive mask over its own keys (and the window), once per step."""
    if window is None:
        if chunk.folded_bias is None:
            chunk.folded_bias = additive_mask(fold_mask(chunk.mask, group), dtype)
        return chunk.folded_bias
    if window not in chunk.masks:
        first = cascade.row_start + row
        query_positions = metadata.positions[first : first + chunk.num_queries].unsqueeze(1)
        prefix_len = cascade.prefix_blocks.numel() * metadata.block_size
        key_positions = torch.arange(prefix_len, prefix_len + chunk.suffix_len).unsqueeze(0)
        visible = chunk.mask & (key_positions > query_positions - window)
        chunk.masks[window] = additive_mask(fold_mask(visible, group), dtype)
    return chunk.masks[window]


def _prefix_kv(
    k_rows: torch.Tensor, v_rows: torch.Tensor, cascade: CascadeGroup, layer: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group prefix's K and V as [P, kv_heads, D]: kept from an earlier step, or gathered
    (and kept, in the [kv_heads, P, D] memory order the kernel reads, when there is a store)."""
    kept = cascade.prefix_kv
    if kept is not None and kept[layer] is not None:
        return kept[layer]
    keys = gather_blocks(k_rows, cascade.prefix_blocks, num_kv_heads, head_dim)
    values = gather_blocks(v_rows, cascade.prefix_blocks, num_kv_heads, head_dim)
    if kept is not None:
        keys = keys.transpose(0, 1).contiguous().transpose(0, 1)
        values = values.transpose(0, 1).contiguous().transpose(0, 1)
        kept[layer] = (keys, values)
    return keys, values


# PyTorch's fused CPU attention kernel also returns the log-sum-exp we need for merging; about
# twice as fast as the explicit form below for our shapes (measured on 2 cores).
_FUSED_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q: [B, H, M, D], k and v: [B, H, L, D]; mask broadcastable to [B, H, M, L], boolean (True =
    attend) or an additive bias. Returns out [B, H, M, D] and lse [B, H, M]. The fused kernel
    takes the common case; soft-capped scores, and a boolean mask that hides every key of some
    query (a sliding window can), take the explicit form.
    """
    if _FUSED_WITH_LSE is None or q.device.type != "cpu" or softcap:
        return attention_with_lse_reference(q, k, v, scale, mask, softcap)
    if mask is not None and mask.dtype == torch.bool:
        if not bool(mask.any(-1).all()):
            return attention_with_lse_reference(q, k, v, scale, mask)
        mask = additive_mask(mask, q.dtype)
    out, lse = _FUSED_WITH_LSE(q, k, v, scale=scale, attn_mask=mask)
    return out, lse


def attention_with_lse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit form of `attention_with_lse`: the slow path its fused form is tested against.
    A query that sees no key gets out 0 and lse -inf, which merging treats as an empty part.
    Scores and weights are float32 whatever the inputs' dtype."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(scores.dtype).min))
    return torch.matmul(weights.to(v.dtype), v), lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Exact softmax attention over the union of two disjoint key sets, from each part's result.

    softmax over A u B = (e^lse_a * out_a + e^lse_b * out_b) / (e^lse_a + e^lse_b)
                       = out_b + sigmoid(lse_a - lse_b) * (out_a - out_b),
    which never overflows and is three ops. A part that saw no key (lse -inf) gets weight 0.
    """
    weight_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    return torch.lerp(out_b, out_a, weight_a.to(out_a.dtype))


def fold_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[N, L] mask of N queries -> [1, 1, N * group, L]: row (query i, head g) of the folded layout
    takes row i."""
    return mask.repeat_interleave(group, dim=0).view(1, 1, mask.shape[0] * group, mask.shape[1])


def folded_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    folded_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of one key set with grouped-query heads folded into the query dimension, so the
    whole set is one [kv_heads, N * group, L] product. q: [N, heads, D]; k, v: [L, kv_heads, D];
    folded_mask: None or `fold_mask` of an [N, L] mask (boolean or additive). Returns out
    [N, heads, D] and lse [N, heads]."""
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    folded = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
    folded = folded.reshape(1, num_kv_heads, num_queries * group, head_dim)
    out, lse = attention_with_lse(
        folded, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale, folded_mask, softcap
    )
    out = out.view(num_kv_heads, num_queries, group, head_dim).permute(1, 0, 2, 3)
    lse = lse.view(num_kv_heads, num_queries, group).permute(1, 0, 2)
    return out.reshape(num_queries, num_heads, head_dim), lse.reshape(num_queries, num_heads)
