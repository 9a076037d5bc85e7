"""Paged attention over the KV cache: the torch reference path.

The KV cache of one layer is a flat array of slots, [num_slots, kv_heads, head_dim]; a sequence's
keys live in the blocks its block table names. A step's tokens come decodes first (one query per
sequence, batched into a single product with a padding mask), then prefill chunks (each a causal
block of queries against all of its sequence's keys so far).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # first row of this chunk in the step's flat token batch
    num_queries: int
    context_len: int  # keys this chunk attends to: positions [0, context_len)
    context_blocks: torch.Tensor  # [ceil(context_len / block_size)] the sequence's blocks
    mask: torch.Tensor | None  # [num_queries, context_len] bool, None when plainly causal


@dataclass(slots=True)
class SuffixChunk:
    """A group member's prefill chunk: its queries against its own keys after the shared prefix."""

    query_start: int
    num_queries: int
    suffix_blocks: torch.Tensor  # the member's blocks from the end of the shared prefix on
    suffix_len: int  # keys at positions [prefix_len, prefix_len + suffix_len)
    mask: torch.Tensor  # [num_queries, suffix_len] bool


@dataclass(slots=True)
class CascadeGroup:
    """The queries of one prefix group in a step, attended as prefix (once) + own suffixes."""

    prefix_blocks: torch.Tensor  # the group's shared full blocks
    rows: torch.Tensor  # flat-batch rows of every query of the group: decode rows, then chunks
    num_decodes: int  # rows[:num_decodes] are single-query decodes
    decode_suffix_blocks: torch.Tensor | None  # [num_decodes, max_blocks], padded with block 0
    decode_suffix_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    chunks: list[SuffixChunk] = field(default_factory=list)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each token's K and V are written
    block_size: int
    num_decodes: int = 0  # rows [0, num_decodes) are single-query decodes
    decode_blocks: torch.Tensor | None = None  # [num_decodes, max_blocks] (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    cascades: list[CascadeGroup] = field(default_factory=list)


def causal_mask(start_position: int, num_queries: int, context_len: int) -> torch.Tensor | None:
    """Query i sits at position start+i and sees keys 0..start+i. None when the plain causal
    (top-left aligned) mask of a square block already says that."""
    if start_position == 0 and num_queries == context_len:
        return None
    query_positions = torch.arange(start_position, start_position + num_queries).unsqueeze(1)
    return torch.arange(context_len).unsqueeze(0) <= query_positions


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, D] -> [T, heads, D]. Keys and values must already be written to the cache."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    # Gathering whole blocks copies contiguous runs of block_size slots: far cheaper than a
    # gather per slot.
    k_blocks = k_cache.view(-1, metadata.block_size, num_kv_heads, head_dim)
    v_blocks = v_cache.view(-1, metadata.block_size, num_kv_heads, head_dim)

    num_decodes = metadata.num_decodes
    if num_decodes:
        # Grouped-query heads fold into the query dimension: [S, kv_heads, group, D].
        queries = q[:num_decodes].view(num_decodes, num_kv_heads, group, head_dim)
        keys = k_blocks[metadata.decode_blocks].flatten(1, 2).transpose(1, 2)  # [S, kv_heads, L, D]
        values = v_blocks[metadata.decode_blocks].flatten(1, 2).transpose(1, 2)
        decoded = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=metadata.decode_mask, scale=scale
        )
        out[:num_decodes] = decoded.reshape(num_decodes, num_heads, head_dim)

    for chunk in metadata.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.num_queries)
        queries = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, D]
        length = chunk.context_len
        keys = k_blocks[chunk.context_blocks].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
        values = v_blocks[chunk.context_blocks].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[rows] = attended.squeeze(0).transpose(0, 1)

    for cascade in metadata.cascades:
        out[cascade.rows] = _cascade_attention(q, k_blocks, v_blocks, cascade, scale)
    return out


# -- shared-prefix (cascade) attention -----------------------------------------------------------


def _cascade_attention(
    q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, cascade: CascadeGroup, scale: float
) -> torch.Tensor:
    num_kv_heads, head_dim = k_blocks.shape[2], k_blocks.shape[3]
    queries = q[cascade.rows]  # [N, heads, D]
    num_heads = queries.shape[1]
    group = num_heads // num_kv_heads
    prefix_k = k_blocks[cascade.prefix_blocks].flatten(0, 1)
    prefix_v = v_blocks[cascade.prefix_blocks].flatten(0, 1)
    prefix_out, prefix_lse = shared_prefix_attention(queries, prefix_k, prefix_v, scale)

    suffix_out = torch.empty_like(queries)
    suffix_lse = torch.empty(queries.shape[:2], dtype=queries.dtype)
    num_decodes = cascade.num_decodes
    if num_decodes:
        folded = queries[:num_decodes].view(num_decodes, num_kv_heads, group, head_dim)
        keys = k_blocks[cascade.decode_suffix_blocks].flatten(1, 2).transpose(1, 2)
        values = v_blocks[cascade.decode_suffix_blocks].flatten(1, 2).transpose(1, 2)
        out, lse = attention_with_lse(folded, keys, values, scale, cascade.decode_suffix_mask)
        suffix_out[:num_decodes] = out.reshape(num_decodes, num_heads, head_dim)
        suffix_lse[:num_decodes] = lse.reshape(num_decodes, num_heads)
    row = num_decodes
    for chunk in cascade.chunks:
        rows = slice(row, row + chunk.num_queries)
        keys = k_blocks[chunk.suffix_blocks].flatten(0, 1)[: chunk.suffix_len]
        values = v_blocks[chunk.suffix_blocks].flatten(0, 1)[: chunk.suffix_len]
        suffix_out[rows], suffix_lse[rows] = folded_attention_with_lse(queries[rows], keys, values, scale, chunk.mask)
        row += chunk.num_queries
    return merge_attention(prefix_out, prefix_lse, suffix_out, suffix_lse)


# PyTorch's fused CPU attention kernel also returns the log-sum-exp we need for merging; about
# twice as fast as the explicit form below for our shapes (measured on 2 cores).
_FUSED_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q: [B, H, M, D], k and v: [B, H, L, D], mask broadcastable to [B, H, M, L] (True = attend);
    every query must see at least one key. Returns out [B, H, M, D] and lse [B, H, M].
    """
    if _FUSED_WITH_LSE is None or q.device.type != "cpu":
        return attention_with_lse_reference(q, k, v, scale, mask)
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _FUSED_WITH_LSE(q, k, v, scale=scale, attn_mask=additive)
    return out, lse


def attention_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit form of `attention_with_lse`: the slow path its fused form is tested against.
    A query that sees no key gets out 0 and lse -inf, which merging treats as an empty part."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(scores.dtype).min))
    return torch.matmul(weights, v), lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Exact softmax attention over the union of two disjoint key sets, from each part's result.

    softmax over A u B = (e^lse_a * out_a + e^lse_b * out_b) / (e^lse_a + e^lse_b), computed
    relative to the larger lse so nothing overflows.
    """
    top = torch.maximum(lse_a, lse_b)
    weight_a = torch.exp(lse_a - top).unsqueeze(-1)
    weight_b = torch.exp(lse_b - top).unsqueeze(-1)
    return (out_a * weight_a + out_b * weight_b) / (weight_a + weight_b)


def shared_prefix_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a group's queries against the group's shared prefix, reading the prefix once.

    q: [N, heads, D] (decode tokens and prefill chunk rows of every member alike: each sits after
    the prefix, so no mask is needed); prefix_k, prefix_v: [P, kv_heads, D]. Returns out
    [N, heads, D] and lse [N, heads].
    """
    return folded_attention_with_lse(q, prefix_k, prefix_v, scale)


def folded_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of one key set with grouped-query heads folded into the query dimension, so the
    whole set is one [kv_heads, N * group, L] product. q: [N, heads, D]; k, v: [L, kv_heads, D];
    mask: [N, L] (True = attend) or None. Returns out [N, heads, D] and lse [N, heads]."""
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    folded = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
    folded = folded.reshape(1, num_kv_heads, num_queries * group, head_dim)
    if mask is not None:  # row (query i, head g) of the folded layout takes mask row i
        mask = mask.repeat_interleave(group, dim=0).view(1, 1, num_queries * group, -1)
    out, lse = attention_with_lse(folded, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale, mask)
    out = out.view(num_kv_heads, num_queries, group, head_dim).permute(1, 0, 2, 3)
    lse = lse.view(num_kv_heads, num_queries, group).permute(1, 0, 2)
    return out.reshape(num_queries, num_heads, head_dim), lse.reshape(num_queries, num_heads)
