"""Model shapes larger than the embedded default, as Hugging Face folders of random weights.

    .venv/bin/python benchmarks/shapes.py llama-1b      # writes benchmarks/.model-llama-1b (gitignored)

No model hub is reachable here, so a 1B-class model is built from the values of its published
`config.json` with random weights (normal, std 0.02; norms 1), in bfloat16 safetensors, plus the
default model's tokenizer (its ids all lie inside the larger vocabulary). Every engine reads the
same folder. The benchmark fixes output lengths (EOS ignored), so random weights do exactly the
work real ones would: the same matrix shapes, the same tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Llama-3.2-1B's config.json values.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
}


def shape_folder(name: str) -> Path:
    return HERE / f".model-{name}"


def build_shape(name: str) -> Path:
    """The folder for shape `name`, written once (a marker file says it is complete)."""
    import torch
    from safetensors.torch import save_file

    from treebatch.models.loader import load_model

    config = SHAPES[name]
    folder = shape_folder(name)
    marker = folder / "treebatch-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": random(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "self_attn.q_proj.weight": random(q, h), p + "self_attn.k_proj.weight": random(kv, h),
            p + "self_attn.v_proj.weight": random(kv, h), p + "self_attn.o_proj.weight": random(h, q),
            p + "mlp.gate_proj.weight": random(i, h), p + "mlp.up_proj.weight": random(i, h),
            p + "mlp.down_proj.weight": random(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    for f in Path(load_model(None).tokenizer_path).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    marker.write_text(json.dumps(config))
    return folder


if __name__ == "__main__":
    print(build_shape(sys.argv[1] if len(sys.argv) > 1 else "llama-1b"))
