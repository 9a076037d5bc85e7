"""Tiny random-weight Llama-3 (rope scaling, untied head) and Qwen2 (q/k/v bias) models: treebatch's
decoder, loaded from a Hugging Face folder, equals transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from treebatch.core.outputs import ScheduledChunk
from treebatch.models.decoder import DecoderForCausalLM
from treebatch.models.loader import load_model
from treebatch.runtime.kv_cache import allocate_kv_cache
from treebatch.core.step_layout import StepLayout
from treebatch.runtime.step_inputs import build_step_inputs

transformers = pytest.importorskip("transformers")


def tiny_llama3():
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_qwen2():
    config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # biases start at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("build", [tiny_llama3, tiny_qwen2], ids=["llama3", "qwen2"])
def test_tiny_model_prefill_and_chunks_match_transformers(build, tmp_path):
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    model = DecoderForCausalLM(loaded.config, loaded.weights)
    block_size = 4
    kv_cache = allocate_kv_cache(loaded.config, 64, block_size, torch.float32)

    ids = torch.randint(0, 300, (150,)).tolist()  # past the original 32 positions: scaling matters
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    table = list(range(1, 1 + -(-len(ids) // block_size)))
    # The prompt in three chunks, as chunked prefill runs it: each sees the KV of the ones before.
    logits = []
    for start, stop in ((0, 50), (50, 149), (149, 150)):
        chunk = ScheduledChunk("x", ids[start:stop], start, table, needs_sample=True, num_output_tokens=0)
        input_ids, positions, _, metadata = build_step_inputs(StepLayout([], [chunk]), block_size)
        rows = torch.arange(stop - start)
        logits.append(model.forward(input_ids, positions, metadata, kv_cache, rows))
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-4, rtol=1e-4)
