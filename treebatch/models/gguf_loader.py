"""Read a GGUF file into float32 weights with Hugging Face Llama names.

The dequantizers below follow the GGML block layouts (ggml-common.h). Each one
takes the raw bytes of a tensor viewed as ``[n_blocks, type_size]`` uint8 and
returns ``[n_blocks, block_size]`` float32. The arithmetic is done in float32 in
the same order as GGML's reference code (``(d * scale) * q - (dmin * min)``),
so the results are bit-identical to ``gguf.quants.dequantize`` (the tests check).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES

from treebatch.config import ModelConfig
from treebatch.models.checks import ModelLoadError, check_shapes
from treebatch.models.families import GEMMA, GGUF_ARCHITECTURES, PERMUTED_QK, gguf_features, gguf_longrope


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as a float32 column [n, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & np.uint8(0x0F), qs >> np.uint8(4)


def dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    # block: f16 d, int8 qs[32]; y = d * q
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    # block: f16 d, qs[16]; low nibbles are elements 0..15, high nibbles 16..31; y = d * (q - 8)
    d = _f16(blocks, 0)
    lo, hi = _nibbles(blocks[:, 2:18])
    q = np.concatenate([lo, hi], axis=1).astype(np.float32) - np.float32(8)
    return d * q


def dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    # block: f16 d, f16 m, qs[16]; y = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    lo, hi = _nibbles(blocks[:, 4:20])
    return d * np.concatenate([lo, hi], axis=1).astype(np.float32) + m


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes holding eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K).

    Bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits; bytes 8-11 hold the
    low 4 bits of scales / mins 4-7, whose top 2 bits sit in the top bits of bytes 0-7.
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 8, 32]: each 32-byte chunk gives sub-block 2c (low) then 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 32)
    lo, hi = _nibbles(qs)
    return np.stack([lo, hi], axis=2).reshape(-1, 8, 32)


def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    # super-block of 256: f16 d, f16 dmin, scales[12], qs[128]; 8 sub-blocks of 32
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:144]).astype(np.float32)
    y = (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]
    return y.reshape(-1, 256)


def dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    # f16 d, f16 dmin, scales[12], qh[32], qs[128]; bit j of qh[l] is the 5th bit of sub-block j, element l
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = (_k_low_nibbles(blocks[:, 48:176]) | (high << np.uint8(4))).astype(np.float32)
    y = (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]
    return y.reshape(-1, 256)


def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql[128], qh[64], int8 scales[16], f16 d. Two halves of 128 values; in half h, group g (32 values):
    # low 4 bits from ql[64h + 32*(g%2) + l] nibble g//2, high 2 bits from qh[32h + l] >> 2g.
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # [half, part, l]
    lo, hi = _nibbles(ql)
    low = np.stack([lo, hi], axis=2).reshape(n, 2, 4, 32)  # group = nibble * 2 + part
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & np.uint8(3)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # one per 16 values
    d = _f16(blocks, 208)
    y = (d * scales)[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)
    return y.reshape(-1, 256)


DEQUANTIZERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.Q8_0: dequant_q8_0,
    QT.Q4_0: dequant_q4_0,
    QT.Q4_1: dequant_q4_1,
    QT.Q4_K: dequant_q4_k,
    QT.Q5_K: dequant_q5_k,
    QT.Q6_K: dequant_q6_k,
}


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Tensor data as GGUFReader gives it (rows first; quantized rows as bytes) -> float32 copy."""
    if qtype in (QT.F32, QT.F16):
        return data.astype(np.float32)  # copy: the reader's array is a read-only memory map
    if qtype == QT.BF16:
        # bfloat16 is the top half of a float32
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (*data.shape[:-1], data.shape[-1] // type_size * block_size)
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        import gguf.quants  # rarer formats: the gguf package's own reference code

        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)
    return fn(data.reshape(-1, type_size)).reshape(shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order: interleave the two rotary halves of each head (for tests)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo `permute_qk`: back to the HF order used with rotate_half rotary embeddings."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
    "rope_factors_short.weight": "rope_factors_short",
    "rope_factors_long.weight": "rope_factors_long",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's four norms per layer: llama.cpp calls the pre-MLP one ffn_norm, as Llama's.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3's ffn_up is the fused gate/up projection (gate first), with no ffn_gate beside it.
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "ffn_up.weight": "mlp.gate_up_proj.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA_LAYER_NAMES if arch in GEMMA else _PHI3_LAYER_NAMES if arch == "phi3" else _LAYER_NAMES
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF file (treebatch does not know what it does)")


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields except the large tokenizer arrays (not needed here)."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip and not k.startswith("GGUF.")}


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or factor is None or float(factor) == 1.0:
        return None  # Llama-3 frequency factors, if any, come as the rope_freqs tensor
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> tuple[ModelConfig, int]:
    """ModelConfig and context length from GGUF metadata."""
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    vocab = get("vocab_size")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    context_length = int(get("context_length", 4096))
    num_layers = int(get("block_count"))
    features = gguf_features(arch, meta, tensor_names, int(head_dim), num_layers, hidden, heads)
    config = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        # Kept as the float32 stored in the file, as transformers does, so both agree exactly.
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        max_position_embeddings=context_length,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in meta else None,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        architecture=arch,
        **features,
    )
    return config, context_length


def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader, once its header parses and every tensor's data lies within the file."""
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, struct.error) as exc:
        if "GGMLQuantizationType" in str(exc):
            raise ModelLoadError(
                f"{path}: a tensor has a quantization type unknown to treebatch's gguf reader ({exc}); "
                "the file may come from a newer llama.cpp, or be corrupt"
            ) from exc
        size = Path(path).stat().st_size
        raise ModelLoadError(f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt: {exc})") from exc
    size = Path(path).stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes:,}, the file has {size:,}"
            )
    return reader


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Config, float32 weights (HF names, HF q/k order) and metadata of a GGUF file. A file
    that is not GGUF, is cut short or holds what treebatch cannot read raises ModelLoadError."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    arch = meta.get("general.architecture")
    if f"{arch}.vocab_size" not in meta:  # older files: the embedding's row count is the vocab size
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        meta[f"{arch}.vocab_size"] = int(embd.shape[-1])
    config, _ = config_from_metadata(meta, names)
    arch = config.architecture
    # llama.cpp permutes q/k rows only for Llama-style models; the others keep the HF order.
    permuted = arch in PERMUTED_QK
    weights: dict[str, np.ndarray] = {}
    by_name = {hf_name(t.name, arch): t for t in reader.tensors}
    # GGML lists a tensor's dimensions fastest first: reversed, they are the HF shape.
    check_shapes(config, by_name, lambda name: tuple(int(n) for n in reversed(by_name[name].shape)), str(path))
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as exc:
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise ModelLoadError(f"{path}: tensor {t.name}: quantization type {kind} cannot be read ({exc})") from exc
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, config.num_kv_heads)
        elif arch in GEMMA and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
        weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    short, long = weights.pop("rope_factors_short", None), weights.pop("rope_factors_long", None)
    if long is not None:
        scaling = gguf_longrope(meta, arch, short.tolist() if short is not None else [1.0] * len(long), long.tolist())
        config = dataclasses.replace(config, rope_scaling=scaling)
    return config, weights, meta
