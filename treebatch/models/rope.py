"""Rotary position embeddings: the tables of cos and sin per position, in each scaling the
supported families use (none, linear, Llama 3, Phi-3's LongRoPE), over all of a head or its
first `rotary_dim` dimensions (partial rotary)."""

from __future__ import annotations

import math
from typing import Any

import torch

from treebatch.config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise for a scaling kind treebatch does not implement (at load time, before any weight)."""
    kind = rope_kind(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "longrope":
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if key not in scaling:  # type: ignore[operator]
                raise ValueError(f"longrope scaling needs {key!r}")


def rope_kind(scaling: dict[str, Any] | None) -> str:
    scaling = scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def _base_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _position_frequencies(
    config: ModelConfig, num_positions: int, theta: float, scaling: dict[str, Any] | None,
    rope_freqs: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    """([positions, rotary_dim / 2] angles, the factor cos and sin are scaled by)."""
    dim = config.rotary_dim
    inv_freq = _base_frequencies(theta, dim)
    kind = rope_kind(scaling)
    positions = torch.arange(num_positions, dtype=torch.float32)
    if kind == "longrope":
        # Phi-3: per-frequency divisors, the short set within the original context, the long one
        # beyond it, chosen per position. transformers chooses per forward pass (by its longest
        # sequence) and its generate() recomputes the cache when a sequence crosses the original
        # length; the two agree exactly while a sequence stays within the original context.
        assert scaling is not None
        original = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or config.max_position_embeddings / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short = inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
        long = inv_freq / torch.tensor(scaling["long_factor"], dtype=torch.float32)
        chosen = torch.where((positions >= original).unsqueeze(1), long, short)
        return positions.unsqueeze(1) * chosen, float(attention)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)  # type: ignore[arg-type]
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    if rope_freqs is not None:  # GGUF stores Llama-3 scaling as per-frequency divisors
        inv_freq = inv_freq / rope_freqs.float()
    return torch.outer(positions, inv_freq), 1.0


def rope_tables(
    config: ModelConfig, num_positions: int, dtype: torch.dtype, local: bool = False,
    rope_freqs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed_sin), each [positions, rotary_dim], for `apply_rope`. `local`: the tables of
    the sliding-window layers where the family gives them their own base (Gemma 3)."""
    if local and config.local_rope_theta is not None:
        freqs, attention = _position_frequencies(config, num_positions, config.local_rope_theta, None, None)
    else:
        freqs, attention = _position_frequencies(config, num_positions, config.rope_theta, config.rope_scaling, rope_freqs)
    cos = torch.cat((freqs, freqs), dim=-1).cos() * attention
    sin = freqs.sin() * attention
    return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, signed_sin: [T, 1, R] with R <= D: the first R dimensions rotate
    (the half-split, rotate_half layout of HF weights), the rest pass through.
    rotate_half(x) * sin == roll(x, R/2) * signed_sin, with signed_sin = (-sin, sin) over the two
    halves. Two rounded products and their sum, as transformers computes it (a fused
    multiply-add would round once and differ in the last bit), so float32 results are equal."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + torch.roll(x, rotary // 2, dims=-1) * signed_sin
    rotated = x[..., :rotary]
    rotated = rotated * cos + torch.roll(rotated, rotary // 2, dims=-1) * signed_sin
    return torch.cat([rotated, x[..., rotary:]], dim=-1)
