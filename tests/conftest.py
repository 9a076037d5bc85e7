"""Shared fixtures: the default model as treebatch loads it, and transformers' own load of it."""

from __future__ import annotations

import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "The quick brown fox",
    "import numpy as np\nimport torch\n\n# A function that",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Photosynthesis is the process by which",
    "1, 1, 2, 3, 5, 8,",
    "Write a haiku about autumn leaves.",
    "The three laws of thermodynamics are",
    "In 1969, astronauts",
    "Dear hiring manager, I am writing to apply for",
    "SELECT name, age FROM users WHERE",
    "A short summary of the plot of Hamlet: Prince Hamlet of Denmark returns home to find that his "
    "father, the king, has died and his uncle Claudius has married his mother. The ghost of his father",
]


@pytest.fixture(scope="session")
def llm():
    from treebatch import LLM

    # A fixed token budget: the session model needs no start-up calibration.
    return LLM(dtype="float32", kv_cache_memory=512 << 20, max_num_batched_tokens=512, check_integrity=True)


@pytest.fixture(scope="session")
def hf_model():
    """transformers' independent load of the same GGUF file, dequantized to float32."""
    pytest.importorskip("accelerate")
    import torch
    from transformers import AutoModelForCausalLM

    from treebatch.models.default import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(params=[False, True], ids=["dot-products", "amx"])
def matrix_unit(request):
    """The bfloat16 tile kernels with the AMX matrix unit off, then on (skipped where the CPU has
    none); set back to on after the test."""
    from treebatch.layers import native

    if request.param and not native.attention_amx(True):
        pytest.skip("needs AMX-BF16")
    native.attention_amx(request.param)
    yield request.param
    native.attention_amx(True)
