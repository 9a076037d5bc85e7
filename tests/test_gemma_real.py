"""The second real model, gemma-3-270m (Q4_K_M GGUF from the package registry): treebatch's
greedy float32 tokens equal transformers' on the same file, for 16 real-text prompts x 16 tokens
in one batch (the reference, transformers one prompt at a time, is most of this file's time).
Gemma 3 exercises what SmolLM2 does not: local and global layers (512-token windows), q/k norms,
(1 + w) sandwich norms, GELU, scaled embeddings, a local rotary base, head_dim 256 and a 262k
vocabulary."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS
from treebatch import LLM, SamplingParams

NUM_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    from treebatch.models.named import resolve_model

    try:
        path, _ = resolve_model("gemma3-270m")
    except RuntimeError as error:  # neither installed nor downloadable here
        pytest.skip(f"gemma3-270m unavailable: {str(error)[:200]}")
    return Path(path)


@pytest.fixture(scope="module")
def llm(gemma_file):
    return LLM(model="gemma3-270m", dtype="float32", max_num_batched_tokens=512, kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def reference(gemma_file, llm):
    """transformers' own load of the file (dequantized to float32), greedy, one prompt at a time."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gemma_file.parent), gguf_file=gemma_file.name, dtype=torch.float32)
    model.eval()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = [], 0
    config.max_new_tokens, config.do_sample = NUM_TOKENS, False
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.tokenizer(prompt).input_ids])
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def test_the_model_is_read_as_gemma3(llm):
    config = llm.engine.model_config
    assert config.architecture == "gemma3" and config.qk_norm and config.sandwich_norms
    assert config.layer_windows.count(None) == 3 and set(config.layer_windows) == {512, None}
    assert llm.tokenizer("Hello").input_ids[0] == config.bos_token_id == 2  # completions start with BOS


def test_greedy_matches_transformers_in_one_batch(llm, reference):
    assert len(PROMPTS) == 16
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, expected in zip(outputs, reference):
        assert output.outputs[0].token_ids == expected, output.prompt
