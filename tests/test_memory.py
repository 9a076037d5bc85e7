"""A model that cannot fit is refused before its weights are converted, with the numbers."""

from __future__ import annotations

import pytest

from treebatch.config import ModelConfig
from treebatch.runtime.memory import check_fits, memory_need, weight_bytes

# Llama-3.2-1B's shape.
ONE_B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, tie_word_embeddings=True)


def test_weights_as_held_per_dtype():
    embeddings = ONE_B.vocab_size * ONE_B.hidden_size
    projections = ONE_B.num_parameters - embeddings
    assert weight_bytes(ONE_B, 2, 1) == (projections + 2 * embeddings) * 2  # packed once; embedding + packed head
    assert weight_bytes(ONE_B, 4, 2) == (2 * projections + 2 * embeddings) * 4  # plain + packed
    assert 2.0e9 < weight_bytes(ONE_B, 2, 1) < 3.5e9


def test_too_big_is_refused_with_the_numbers():
    need = memory_need(ONE_B, 4, 2, 131072, available=4 << 30)
    assert not need.fits
    with pytest.raises(MemoryError, match=r"needs .* GiB of weights plus .* GiB of KV cache .* only 4.00 GiB"):
        check_fits(need, "llama-1b", "float32")
    check_fits(memory_need(ONE_B, 2, 1, 2048, available=8 << 30), "llama-1b", "bfloat16")  # fits: no error


def test_the_engine_refuses_before_building_the_model(monkeypatch):
    import treebatch.engine as engine

    monkeypatch.setattr(engine, "available_memory_bytes", lambda: 16 << 20)
    monkeypatch.setattr(engine, "DecoderForCausalLM", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(MemoryError, match="16 MiB|0.02 GiB"):
        engine.LLMEngine(engine.EngineConfig(dtype="float32"))
