"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) written for a paged KV cache.

The forward pass takes one flat batch of tokens from many sequences (decodes and prefill chunks
alike), writes each token's K and V into its cache slot, and attends through the block tables in
`AttentionMetadata`. Logits are computed only for the rows that sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from treebatch.config import ModelConfig
from treebatch.layers.attention import AttentionMetadata, paged_attention
from treebatch.layers.linear import HEAD_PACKED_MAX_ROWS, PACKED_MAX_ROWS, Linear


def rope_inverse_frequencies(config: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with linear or Llama-3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
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
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    if rope_freqs is not None:  # GGUF stores Llama-3 scaling as per-frequency divisors
        inv_freq = inv_freq / rope_freqs.float()
    return inv_freq


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One fused op where torch has it (the explicit form costs six per call)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, signed_sin: [T, 1, D]. The half-split (rotate_half) layout of HF
    weights: rotate_half(x) * sin == roll(x, D/2) * signed_sin, with signed_sin = (-sin, sin) over
    the two halves, so the rotation is three ops."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


class _Layer:
    __slots__ = ("input_norm", "qkv", "o_proj", "post_norm", "gate_up", "down")


class LlamaForCausalLM:
    """Weights in Hugging Face naming -> fused, ready-to-run tensors."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
        packed_max_rows: int = PACKED_MAX_ROWS,
    ) -> None:
        """`packed_max_rows`: up to how many rows a projection takes its packed kernel (the
        engine measures it for this CPU; layers/linear.py)."""
        self.config = config
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            return weights[name].to(dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        lm_head = self.embed if config.tie_word_embeddings else take("lm_head.weight")
        self.head = Linear(lm_head, packed_max_rows=max(packed_max_rows, HEAD_PACKED_MAX_ROWS))
        self.final_norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            layer = _Layer()
            layer.input_norm = take(prefix + "input_layernorm.weight")
            layer.post_norm = take(prefix + "post_attention_layernorm.weight")
            attn = prefix + "self_attn."
            # One matmul for q, k and v; one for gate and up.
            qkv_bias = None
            if config.attention_bias:
                qkv_bias = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
            layer.qkv = Linear(torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"]), qkv_bias,
                               packed_max_rows=packed_max_rows)
            layer.o_proj = Linear(take(attn + "o_proj.weight"), packed_max_rows=packed_max_rows)
            mlp = prefix + "mlp."
            layer.gate_up = Linear(torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
                                   packed_max_rows=packed_max_rows)
            layer.down = Linear(take(mlp + "down_proj.weight"), packed_max_rows=packed_max_rows)
            self.layers.append(layer)

        num_positions = max_positions or config.max_position_embeddings
        inv_freq = rope_inverse_frequencies(config, weights.get("rope_freqs"))
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = emb.cos().to(dtype)
        self.rope_signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype)
        self.scale = config.head_dim**-0.5

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, slots, kv_heads, D] -> logits [S, V]."""
        cfg = self.config
        num_tokens = input_ids.shape[0]
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_signed_sin[positions].unsqueeze(1)
        num_qk_heads = cfg.num_heads + cfg.num_kv_heads

        hidden = F.embedding(input_ids, self.embed)
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(x).contiguous()
            # Queries and keys rotate together: one rotation for all their heads.
            qk = apply_rope(qkv[:, : q_size + kv_size].view(num_tokens, num_qk_heads, cfg.head_dim), cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, q_size + kv_size :].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_cache[index, 0], kv_cache[index, 1]
            k_cache.index_copy_(0, metadata.slot_mapping, k)
            v_cache.index_copy_(0, metadata.slot_mapping, v)
            attn = paged_attention(q, k_cache, v_cache, metadata, self.scale, index)
            hidden = hidden + layer.o_proj(attn.reshape(num_tokens, q_size))

            x = rms_norm(hidden, layer.post_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)

        last = hidden.index_select(0, logits_indices)
        last = rms_norm(last, self.final_norm, cfg.rms_norm_eps)
        return self.head(last).float()
