"""The supported model families: what each one's config.json and GGUF metadata mean as a
ModelConfig. Anything a family's files ask for that treebatch does not implement (an
architecture, a rope type, an activation, a kind of layer) is refused here, at load time, by
name; nothing falls back to Llama silently.

    family   HF model_type      GGUF arch   features switched on
    llama    llama              llama       (Llama 2/3.x, SmolLM2; Llama 3 rope scaling)
    mistral  mistral            llama*      sliding window on every layer (Mistral 7B v0.1)
    qwen2    qwen2              qwen2       q/k/v bias; windows on the upper layers if enabled
    qwen3    qwen3              qwen3       per-head q/k RMSNorm; head_dim free of hidden size
    gemma2   gemma2             gemma2      (1+w) norms, sandwich norms, GELU, scaled embeddings,
                                            local/global layers, soft-capped scores and logits
    gemma3   gemma3_text        gemma3      as gemma2 with q/k norms instead of soft-caps, the
                                            layer pattern from the config, a local rope base
    phi3     phi3               phi3        fused qkv and gate/up, partial rotary, LongRoPE,
                                            a sliding window
    (* llama.cpp writes Mistral as `llama`; its window is then in `llama.attention.sliding_window`)
"""

from __future__ import annotations

import math
from typing import Any

from treebatch.models.rope import check_rope_scaling, rope_kind

HF_MODEL_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
}
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# llama.cpp's converter permutes the q/k rows of these (for its interleaved rotary layout).
PERMUTED_QK = ("llama", "mistral")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_LAYER_TYPES = ("full_attention", "sliding_attention")
GEMMA = ("gemma2", "gemma3")


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _rope_parts(cfg: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the full-attention layers' rope dict, the sliding layers' own one if the config has it):
    from `rope_parameters` (transformers 5, per layer type for Gemma 3) or `rope_scaling`."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(rope, dict) and "full_attention" in rope:
        return rope.get("full_attention"), rope.get("sliding_attention")
    return rope, None


def normalize_rope_scaling(raw: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if not raw:
        return None
    skip = ("rope_theta", "partial_rotary_factor")  # `rope_parameters` holds these too
    scaling = {k: v for k, v in raw.items() if k not in skip}
    if "type" in scaling:  # older configs name the kind `type`
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type") == "su":  # Phi-3's early name for LongRoPE
        scaling["rope_type"] = "longrope"
    if rope_kind(scaling) == "default":
        return None
    if rope_kind(scaling) == "longrope" and "original_max_position_embeddings" not in scaling:
        if "original_max_position_embeddings" in cfg:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    check_rope_scaling(scaling)
    return scaling


def rope_theta(cfg: dict[str, Any], default: float = 10000.0) -> float:
    full, _ = _rope_parts(cfg)
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(full, dict):
        theta = full.get("rope_theta")
    return float(theta if theta is not None else default)


def hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    return normalize_rope_scaling(_rope_parts(cfg)[0], cfg)


def _hf_layer_windows(family: str, cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer type(s) {unknown} are not supported (supported: {', '.join(_LAYER_TYPES)})")
        if len(types) != num_layers:
            raise ValueError(f"layer_types lists {len(types)} layers, the model has {num_layers}")
        if "sliding_attention" in types and not window:
            raise ValueError("sliding_attention layers without a sliding_window")
        if family in ("mistral", "phi3") and window and "sliding_attention" not in types:
            types = ["sliding_attention"] * num_layers  # these configs window every layer
    elif not window:
        return ()
    elif family == "gemma2":  # local, global, local, ...
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    elif family == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern") or 6)  # every pattern-th layer is global
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    elif family in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window"):
            return ()
        first = int(cfg.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    elif family in ("mistral", "phi3"):
        types = ["sliding_attention"] * num_layers
    else:
        raise ValueError(f"a sliding_window in a {family} config is not supported")
    if "sliding_attention" not in types:
        return ()
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def hf_features(family: str, cfg: dict[str, Any], num_layers: int, head_dim: int) -> dict[str, Any]:
    """The ModelConfig fields a family's config.json sets beyond the Llama ones."""
    features: dict[str, Any] = {
        "layer_windows": _hf_layer_windows(family, cfg, num_layers),
        "hidden_act": _activation(str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")),
    }
    full, local = _rope_parts(cfg)
    partial = cfg.get("partial_rotary_factor") or (full or {}).get("partial_rotary_factor")
    if partial is not None:
        features["partial_rotary_factor"] = float(partial)
    if family in ("qwen3", "gemma3"):
        features["qk_norm"] = True
    if family in GEMMA:
        features.update(
            norm_offset=1.0,
            sandwich_norms=True,
            embedding_multiplier=math.sqrt(int(cfg["hidden_size"])),
            attention_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
            attn_logit_softcap=_positive(cfg.get("attn_logit_softcapping")),
            final_logit_softcap=_positive(cfg.get("final_logit_softcapping")),
        )
    if family == "gemma3":
        local_theta = cfg.get("rope_local_base_freq")
        if local_theta is None and isinstance(local, dict):
            if normalize_rope_scaling(local, cfg) is not None:
                raise ValueError("rope scaling on the sliding-window layers is not supported")
            local_theta = local.get("rope_theta")
        features["local_rope_theta"] = float(local_theta if local_theta is not None else 10000.0)
    return features


def _positive(value: Any) -> float | None:
    return float(value) if value else None


# ---------------------------------------------------------------- GGUF metadata


def gguf_features(arch: str, meta: dict[str, Any], tensor_names: set[str], head_dim: int, num_layers: int,
                  hidden: int, num_heads: int) -> dict[str, Any]:
    """The ModelConfig fields a GGUF file's metadata sets beyond the Llama ones, read as
    llama.cpp reads them (where it hard-codes a value, so do we)."""

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    features: dict[str, Any] = {}
    window = get("attention.sliding_window")
    if window:
        window = int(window)
        if arch == "gemma2":
            features["layer_windows"] = tuple(window if i % 2 == 0 else None for i in range(num_layers))
        elif arch == "gemma3":
            pattern = int(get("attention.sliding_window_pattern", 6))
            features["layer_windows"] = tuple(window if (i + 1) % pattern else None for i in range(num_layers))
        elif arch in ("llama", "mistral", "phi3"):
            features["layer_windows"] = (window,) * num_layers
        else:
            raise ValueError(f"a sliding window in a {arch} GGUF file is not supported")
    if "blk.0.attn_q_norm.weight" in tensor_names:
        features["qk_norm"] = True
    rotary = get("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        features["partial_rotary_factor"] = int(rotary) / head_dim
    if arch in GEMMA:
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 27B
        # models (46 and 62 layers), which is their query_pre_attn_scalar.
        big = (arch == "gemma2" and num_layers == 46) or (arch == "gemma3" and num_layers == 62)
        features.update(
            norm_offset=1.0,
            sandwich_norms=True,
            hidden_act="gelu_tanh",
            embedding_multiplier=math.sqrt(hidden),
            attention_scale=(hidden / num_heads if big else head_dim) ** -0.5,
            attn_logit_softcap=_positive(get("attn_logit_softcapping")),
            final_logit_softcap=_positive(get("final_logit_softcapping")),
        )
    if arch == "gemma3":
        features["local_rope_theta"] = 10000.0  # llama.cpp's fixed base of the local layers
    return features


def gguf_longrope(meta: dict[str, Any], arch: str, short: list[float], long: list[float]) -> dict[str, Any]:
    """Phi-3's LongRoPE from GGUF: the factors are tensors, the rest metadata."""
    scaling: dict[str, Any] = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": int(meta[f"{arch}.rope.scaling.original_context_length"]),
    }
    attention = meta.get(f"{arch}.rope.scaling.attn_factor")
    if attention is not None:
        scaling["attention_factor"] = float(attention)
    return scaling
