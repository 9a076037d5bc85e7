"""The decoder-only transformer every supported family is, written for a paged KV cache.

Llama's layer (RMSNorm, attention with rotary embeddings, a gated MLP) with the features other
families switch on in their ModelConfig (models/families.py): q/k norms, sandwich norms, (1 + w)
norms, GELU gates, scaled embeddings, sliding windows per layer, soft-capped scores and logits,
partial rotary, a second rotary base for the local layers, fused qkv and gate/up weights.

The forward pass takes one flat batch of tokens from many sequences (decodes and prefill chunks
alike), writes each token's K and V into its cache slot, and attends through the block tables in
`AttentionMetadata`. Logits are computed only for the rows that sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from treebatch.config import ModelConfig
from treebatch.layers import native
from treebatch.layers.attention import AttentionMetadata, LayerAttention, paged_attention
from treebatch.layers.linear import HEAD_PACKED_MAX_ROWS, KernelChoice, Linear
from treebatch.models.rope import apply_rope, rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One fused op where torch has it (the explicit form costs six per call); `weight` is
    float32, cast to x's dtype as the torch op needs."""
    return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)


def rotate_and_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    fused: bool = True,
) -> torch.Tensor:
    """qkv [T, (heads + 2 kv_heads) * D] -> the rotated queries [T, heads, D], with the rotated
    keys and the values written to their cache slots; q and k per-head normed first where the
    family has q/k norms. `fused`: by the one-pass kernel where it runs (layers/native.py), else
    (and always for False) by torch ops, the path the kernel is tested to equal."""
    if fused:
        q = native.rope_store(qkv, num_heads, num_kv_heads, cos, signed_sin, positions, slot_mapping, k_cache, v_cache,
                              q_norm, k_norm, eps)
        if q is not None:
            return q
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if q_norm is not None:
        q = rms_norm(qkv[:, :q_size].view(num_tokens, num_heads, head_dim), q_norm, eps)
        k = rms_norm(qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim), k_norm, eps)
        qk = torch.cat([q, k], dim=1)
    else:
        qk = qkv[:, : q_size + kv_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
    # Queries and keys rotate together: one rotation for all their heads.
    qk = apply_rope(qk, cos[positions].unsqueeze(1), signed_sin[positions].unsqueeze(1))
    k_cache.index_copy_(0, slot_mapping, qk[:, num_heads:])
    v_cache.index_copy_(0, slot_mapping, qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim))
    return qk[:, :num_heads]


class _Layer:
    __slots__ = ("input_norm", "qkv", "q_norm", "k_norm", "o_proj", "post_attention_norm", "pre_mlp_norm",
                 "gate_up", "down", "post_mlp_norm", "attention", "rope")


class DecoderForCausalLM:
    """Weights in Hugging Face naming -> fused, ready-to-run tensors."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
        kernels: KernelChoice = KernelChoice(),
    ) -> None:
        """`kernels`: which projection kernel serves which batch size (the engine measures it
        for this CPU; layers/linear.py)."""
        self.config = config
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            return weights[name].to(dtype).contiguous()

        def norm(name: str) -> torch.Tensor:
            # (offset + w) once, in float32, as the reference computes it; kept in float32 for
            # the fused norm (layers/native.py), which multiplies by it in float32.
            return (weights[name].float() + config.norm_offset).contiguous()

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, packed_max_rows=kernels.packed_max_rows,
                          native_max_rows=kernels.native_max_rows)

        self.embed = take("model.embed_tokens.weight")
        lm_head = self.embed if config.tie_word_embeddings else take("lm_head.weight")
        self.head = Linear(lm_head, packed_max_rows=max(kernels.packed_max_rows, HEAD_PACKED_MAX_ROWS),
                           native_max_rows=kernels.native_max_rows)
        self.final_norm = norm("model.norm.weight")
        num_positions = max_positions or config.max_position_embeddings
        self.ropes = [rope_tables(config, num_positions, dtype, rope_freqs=weights.get("rope_freqs"))]
        if config.local_rope_theta is not None and any(w is not None for w in config.layer_windows):
            self.ropes.append(rope_tables(config, num_positions, dtype, local=True))
        scale = config.attention_scale if config.attention_scale is not None else config.head_dim**-0.5
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            layer = _Layer()
            attn, mlp = prefix + "self_attn.", prefix + "mlp."
            layer.input_norm = norm(prefix + "input_layernorm.weight")
            # One matmul for q, k and v; one for gate and up (Phi-3 stores them fused already).
            if attn + "qkv_proj.weight" in weights:
                layer.qkv = linear(take(attn + "qkv_proj.weight"))
            else:
                bias = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"]) if config.attention_bias else None
                layer.qkv = linear(torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"]), bias)
            layer.q_norm = norm(attn + "q_norm.weight") if config.qk_norm else None
            layer.k_norm = norm(attn + "k_norm.weight") if config.qk_norm else None
            layer.o_proj = linear(take(attn + "o_proj.weight"))
            if config.sandwich_norms:
                layer.post_attention_norm = norm(prefix + "post_attention_layernorm.weight")
                layer.pre_mlp_norm = norm(prefix + "pre_feedforward_layernorm.weight")
                layer.post_mlp_norm = norm(prefix + "post_feedforward_layernorm.weight")
            else:
                layer.post_attention_norm = layer.post_mlp_norm = None
                layer.pre_mlp_norm = norm(prefix + "post_attention_layernorm.weight")
            if mlp + "gate_up_proj.weight" in weights:
                layer.gate_up = linear(take(mlp + "gate_up_proj.weight"))
            else:
                layer.gate_up = linear(torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]))
            layer.down = linear(take(mlp + "down_proj.weight"))
            window = config.window(i)
            layer.attention = LayerAttention(scale, window, config.attn_logit_softcap)
            layer.rope = 1 if window is not None and len(self.ropes) > 1 else 0
            self.layers.append(layer)

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
        eps = cfg.rms_norm_eps
        num_tokens = input_ids.shape[0]
        q_size = cfg.num_heads * cfg.head_dim
        # The fused kernel reads the rotary tables unchecked: a position past them takes the torch
        # path, which raises.
        fused = num_tokens > 0 and int(positions.max()) < self.ropes[0][0].shape[0]

        hidden = F.embedding(input_ids, self.embed)
        if cfg.embedding_multiplier != 1.0:
            hidden = hidden * torch.tensor(cfg.embedding_multiplier, dtype=self.dtype)
        # Each sublayer's output is added to `hidden` in place by the next norm, in one pass.
        pending: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            x = native.add_rms_norm(hidden, pending, layer.input_norm, eps)
            qkv = layer.qkv(x).contiguous()
            k_cache, v_cache = kv_cache[index, 0], kv_cache[index, 1]
            q = rotate_and_store(qkv, cfg.num_heads, cfg.num_kv_heads, *self.ropes[layer.rope], positions,
                                 metadata.slot_mapping, k_cache, v_cache, layer.q_norm, layer.k_norm, eps, fused)
            attn = paged_attention(q, k_cache, v_cache, metadata, layer.attention, index)
            out = layer.o_proj(attn.reshape(num_tokens, q_size))
            if layer.post_attention_norm is not None:
                out = rms_norm(out, layer.post_attention_norm, eps)

            x = native.add_rms_norm(hidden, out, layer.pre_mlp_norm, eps)
            activated = layer.gate_up.silu_gated(x) if cfg.hidden_act == "silu" else self._gelu_mul(layer.gate_up(x))
            out = layer.down(activated)
            if layer.post_mlp_norm is not None:
                out = rms_norm(out, layer.post_mlp_norm, eps)
            pending = out

        # Only the sampled rows need the last residual add and the final norm.
        last = hidden.index_select(0, logits_indices)
        last = native.add_rms_norm(last, None if pending is None else pending.index_select(0, logits_indices),
                                   self.final_norm, eps)
        logits = self.head.float32_out(last)
        if cfg.final_logit_softcap:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits

    @staticmethod
    def _gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
