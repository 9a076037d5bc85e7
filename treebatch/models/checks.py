"""A model that cannot load is named before any request runs: the file, and what is wrong with
it (truncated, corrupt, a tensor missing or of the wrong shape), never a numpy or torch traceback
from deep inside the conversion."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from treebatch.config import ModelConfig


class ModelLoadError(ValueError):
    """The model at a path cannot be loaded; the message names the file and the reason."""


def expected_shapes(config: ModelConfig, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The shape each weight the decoder reads must have, in HF names; fused forms (Phi-3's
    qkv_proj, gate_up_proj) where `names` holds them."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    present = set(names)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        shapes.update({f"{p}{n}.weight": (h,) for n in norms})
        attn, mlp = p + "self_attn.", p + "mlp."
        if attn + "qkv_proj.weight" in present:
            shapes[attn + "qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            shapes.update({attn + "q_proj.weight": (q, h), attn + "k_proj.weight": (kv, h), attn + "v_proj.weight": (kv, h)})
            if config.attention_bias:
                shapes.update({attn + "q_proj.bias": (q,), attn + "k_proj.bias": (kv,), attn + "v_proj.bias": (kv,)})
        shapes[attn + "o_proj.weight"] = (h, q)
        if config.qk_norm:
            shapes.update({attn + "q_norm.weight": (d,), attn + "k_norm.weight": (d,)})
        if mlp + "gate_up_proj.weight" in present:
            shapes[mlp + "gate_up_proj.weight"] = (2 * i, h)
        else:
            shapes.update({mlp + "gate_proj.weight": (i, h), mlp + "up_proj.weight": (i, h)})
        shapes[mlp + "down_proj.weight"] = (h, i)
    return shapes


def check_shapes(config: ModelConfig, names: Iterable[str], shape_of: Callable[[str], tuple[int, ...]], source: str) -> None:
    """Raise ModelLoadError for a missing weight or one whose shape the config contradicts."""
    names = list(names)
    for name, shape in expected_shapes(config, names).items():
        if name not in names:
            raise ModelLoadError(f"{source}: tensor {name} is missing")
        got = tuple(shape_of(name))
        if got != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")
