"""Tiny random-weight models of every supported family, built with transformers' own config
classes with each family's special features switched on (windows shorter than the prompts,
soft-caps that bite, partial rotary, LongRoPE, q/k norms, a second rotary base), for the tests
that hold treebatch to transformers."""

from __future__ import annotations

import numpy as np
import torch

WINDOW = 24  # shorter than every prompt of the tests
VOCAB = 300


def _common(transformers_config, **extra):
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.15,
    )
    fields.update(extra)
    return transformers_config(**fields)


def build(name: str):
    """A transformers model of family `name`, in eval mode, with random weights that matter."""
    import transformers as t

    torch.manual_seed(sum(map(ord, name)))
    if name == "mistral":
        config = _common(t.MistralConfig, num_hidden_layers=3, sliding_window=WINDOW, head_dim=16)
        model = t.MistralForCausalLM(config)
    elif name.startswith("qwen3"):
        # head_dim apart from hidden / heads; windows on the layers from max_window_layers on
        # (which llama.cpp does not implement for Qwen3: "qwen3-full" has none, for GGUF).
        windowed = name == "qwen3"
        config = _common(t.Qwen3Config, num_hidden_layers=3, head_dim=32, use_sliding_window=windowed,
                         sliding_window=WINDOW if windowed else None, max_window_layers=1, tie_word_embeddings=False)
        model = t.Qwen3ForCausalLM(config)
    elif name == "gemma2":
        config = _common(t.Gemma2Config, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32,
                         sliding_window=WINDOW, attn_logit_softcapping=4.0, final_logit_softcapping=8.0)
        model = t.Gemma2ForCausalLM(config)
    elif name == "gemma3":
        config = _common(
            t.Gemma3TextConfig, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        )
        model = t.Gemma3ForCausalLM(config)
    elif name == "phi3":
        rotary_half = int(16 * 0.5) // 2
        config = _common(
            t.Phi3Config, num_hidden_layers=3, sliding_window=WINDOW, pad_token_id=0, original_max_position_embeddings=128,
            rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)],
                "original_max_position_embeddings": 128,
            },
        )
        model = t.Phi3ForCausalLM(config)
    else:
        raise KeyError(name)
    model = model.eval()
    with torch.no_grad():  # norms start at 1 (or 0 in Gemma); make them matter
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(0.0 if name.startswith("gemma") else 1.0, 0.3)
    return model


FAMILIES = ("mistral", "qwen3", "qwen3-full", "gemma2", "gemma3", "phi3")


# ---------------------------------------------------------------- GGUF, as llama.cpp writes it

GGUF_ARCH = {"mistral": "llama", "qwen3": "qwen3", "qwen3-full": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
}
_LAYER_LLAMA = {**_LAYER, "post_attention_layernorm": "ffn_norm"}
_LAYER_GEMMA = {**_LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(name: str, model, path, tokenizer_gguf=None) -> None:
    """`model` (from `build(name)`) as llama.cpp's converter writes it: its tensor names, q/k rows
    permuted for Llama-style models, Gemma's norms stored as 1 + w, Phi-3's LongRoPE factors as
    tensors; float32 tensors, so the weights are the same numbers. `tokenizer_gguf`: a GGUF file
    whose tokenizer fields are copied in (treebatch converts the tokenizer from the file)."""
    import gguf

    from treebatch.models.gguf_loader import permute_qk

    cfg = model.config
    arch = GGUF_ARCH[name]
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for key, value in {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size, "block_count": cfg.num_hidden_layers,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": head_dim, "attention.value_length": head_dim, "vocab_size": cfg.vocab_size,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    if getattr(cfg, "sliding_window", None):
        writer.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    full = rope.get("full_attention", rope)
    writer.add_float32(f"{arch}.rope.freq_base", full["rope_theta"])
    writer.add_uint32(f"{arch}.rope.dimension_count", int(head_dim * full.get("partial_rotary_factor", 1.0)))
    if full.get("rope_type") == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", full["factor"])
    if name == "gemma2":
        writer.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
        writer.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
    if name == "gemma3":
        pattern = cfg.layer_types.index("full_attention") + 1
        writer.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    if full.get("rope_type") == "longrope":
        original = full["original_max_position_embeddings"]
        factor = cfg.max_position_embeddings / original
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        attention = (1 + np.log(factor) / np.log(original)) ** 0.5 if factor > 1 else 1.0
        writer.add_float32(f"{arch}.rope.scaling.attn_factor", attention)
        writer.add_tensor("rope_factors_short.weight", np.asarray(full["short_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_long.weight", np.asarray(full["long_factor"], dtype=np.float32))
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, tokenizer_gguf)
    layer_names = _LAYER_GEMMA if name.startswith("gemma") else _LAYER_LLAMA
    for hf, tensor in model.state_dict().items():
        data = tensor.float().numpy().copy()
        if hf == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif hf == "model.norm.weight":
            gname = "output_norm.weight"
        elif hf == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            index, rest = hf.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{index}.{layer_names[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                data = permute_qk(data, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                data = permute_qk(data, cfg.num_key_value_heads)
        if name.startswith("gemma") and hf.endswith("norm.weight"):
            data = data + np.float32(1.0)
        writer.add_tensor(gname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_tokenizer(writer, source) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(source))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
