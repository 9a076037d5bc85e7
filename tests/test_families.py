"""Every supported family against transformers on the same tiny random weights (tests/families.py):
prefill logits to 1e-4 in float32 through chunked prefill, and greedy tokens for a batch of varied
prompts longer than the sliding window, in one batch and one at a time, with chunked prefill and
preemption, with prefix sharing on and off."""

from __future__ import annotations

import copy

import pytest
import torch

from families import FAMILIES, VOCAB, WINDOW, build, write_gguf
from treebatch import LLM, SamplingParams
from treebatch.core.outputs import ScheduledChunk
from treebatch.core.step_layout import StepLayout
from treebatch.models.decoder import DecoderForCausalLM
from treebatch.models.default import default_model_path
from treebatch.models.gguf_loader import read_gguf
from treebatch.models.loader import load_model
from treebatch.runtime.kv_cache import allocate_kv_cache
from treebatch.runtime.step_inputs import build_step_inputs
from treebatch.tokenizer import load_tokenizer_only

transformers = pytest.importorskip("transformers")
NUM_TOKENS = 12


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, transformers model, its saved folder)."""
    model = build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    load_tokenizer_only().tokenizer.save_pretrained(folder)  # the default model's: ids < VOCAB decode
    return request.param, model, folder


def _prompts() -> list[list[int]]:
    """Varied lengths past the window; two groups share prefixes longer than the window."""
    g = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    system, document = ids(2 * WINDOW + 5), ids(WINDOW + 3)
    prompts = [system + ids(n) for n in (4, 9, 17, 30)]
    prompts += [system + document + ids(n) for n in (3, 11)]
    prompts += [ids(n) for n in (WINDOW + 1, 2 * WINDOW + 7, 3)]
    return prompts


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(family):
    """transformers' greedy tokens, one prompt at a time."""
    _, model, _ = family
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = [], 0
    config.max_new_tokens, config.do_sample = NUM_TOKENS, False
    out = []
    for prompt in _prompts():
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(generated[0, len(prompt) :].tolist())
    return out


def test_config_is_read_with_the_family_features(family):
    name, model, folder = family
    config = load_model(str(folder)).config
    assert config.architecture == name.removesuffix("-full")
    expected_windows = {
        "mistral": (WINDOW,) * 3,
        "qwen3": (None, WINDOW, WINDOW),
        "qwen3-full": (),
        "gemma2": (WINDOW, None, WINDOW),
        "gemma3": (WINDOW, None, WINDOW, None),
        "phi3": (WINDOW,) * 3,
    }[name]
    assert config.layer_windows == expected_windows
    assert config.qk_norm == (name in ("qwen3", "qwen3-full", "gemma3"))
    if name == "gemma2":
        assert config.attn_logit_softcap == 4.0 and config.final_logit_softcap == 8.0
    if name == "phi3":
        assert config.rotary_dim == 8 and config.rope_scaling["rope_type"] == "longrope"


def test_prefill_logits_match_transformers_through_chunks(family):
    name, model, folder = family
    loaded = load_model(str(folder))
    _check_prefill_logits(name, model, loaded.config, loaded.weights)


def _check_prefill_logits(name, model, config, weights) -> None:
    ours = DecoderForCausalLM(config, weights)
    block_size = 4
    kv_cache = allocate_kv_cache(config, 64, block_size, torch.float32)
    # Phi-3's LongRoPE switches to its long factors past 128 positions: here per position, in
    # transformers for the whole pass (and its generate() recomputes the cache at the switch), so
    # the two agree within the original context, where every test prompt and output stays.
    length = 60 if name == "phi3" else 150
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0]
    table = list(range(1, 1 + -(-length // block_size)))
    logits = []
    cuts = (0, 13, 50, length - 1, length)
    for start, stop in zip(cuts, cuts[1:]):
        chunk = ScheduledChunk("x", ids[start:stop], start, table, needs_sample=True, num_output_tokens=0)
        input_ids, positions, _, metadata = build_step_inputs(StepLayout([], [chunk]), block_size)
        logits.append(ours.forward(input_ids, positions, metadata, kv_cache, torch.arange(stop - start)))
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"max_num_batched_tokens": 128},
        {"enable_prefix_sharing": False, "max_num_batched_tokens": 128},
        {"num_blocks": 40, "block_size": 4, "max_num_batched_tokens": 24},  # chunks and preemptions
    ],
    ids=["shared", "no-sharing", "chunked-preempted"],
)
def test_greedy_matches_transformers_in_one_batch(family, reference, options):
    name, _, folder = family
    if name in ("mistral", "phi3") and "num_blocks" in options:  # every layer windowed: blocks leave
        options = {**options, "num_blocks": 20}  # the window and 40 would hold the batch unpreempted
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=32 << 20, check_integrity=True, **options)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    if "num_blocks" in options:
        assert llm.last_run_summary["preemptions"] > 0
    elif "enable_prefix_sharing" not in options:  # the groups' prefixes are longer than the window
        assert llm.last_run_summary["groups"] > 0


def test_greedy_matches_transformers_one_at_a_time(family, reference):
    _, _, folder = family
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=32 << 20, max_num_batched_tokens=128)
    for prompt, expected in zip(_prompts(), reference):
        assert llm.generate({"prompt_token_ids": prompt}, _greedy(), use_tqdm=False)[0].outputs[0].token_ids == expected


def test_a_windowed_model_generates_past_its_cache_in_a_window_of_blocks(tmp_path):
    # Every Mistral layer has a window of 24: KV blocks behind it go back to the pool, so two
    # sequences of 4 windows each (26 blocks of 4 apiece) run in a pool of 16 and hold at most
    # what the window needs, with transformers' greedy tokens.
    model = build("mistral")
    model.save_pretrained(tmp_path)
    load_tokenizer_only().tokenizer.save_pretrained(tmp_path)
    prompts = [_prompts()[0][:30], _prompts()[-2][:20]]
    num_tokens = 4 * WINDOW
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = [], 0
    config.max_new_tokens, config.do_sample = num_tokens, False
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            expected.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):].tolist())
    llm = LLM(model=str(tmp_path), dtype="float32", num_blocks=16, block_size=4, max_num_batched_tokens=8, check_integrity=True)
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    summary = llm.last_run_summary
    # A decode keeps ceil(23 / 4) + 1 = 7 blocks live, a chunk of 8 at most 9 (KVCacheManager).
    assert summary["preemptions"] == 0 and summary["peak_kv_blocks"] <= 2 * 7 + 2


# ---------------------------------------------------------------- the same through GGUF


@pytest.fixture(scope="module")
def gguf_file(family, tmp_path_factory):
    name, model, _ = family
    path = tmp_path_factory.mktemp(f"{name}-gguf") / f"tiny-{name}.gguf"
    write_gguf(name, model, path, tokenizer_gguf=default_model_path())
    return path


def test_gguf_reads_as_the_hf_folder_does(family, gguf_file):
    name, model, folder = family
    if name == "qwen3":  # llama.cpp has no windowed Qwen3: such a file is refused, not misread
        with pytest.raises(ValueError, match="sliding window in a qwen3 GGUF file is not supported"):
            read_gguf(gguf_file)
        return
    config, weights, _ = read_gguf(gguf_file)
    hf_config = load_model(str(folder)).config
    same = ("layer_windows", "qk_norm", "norm_offset", "sandwich_norms", "hidden_act", "embedding_multiplier",
            "attn_logit_softcap", "final_logit_softcap", "attention_scale", "rotary_dim", "local_rope_theta",
            "rope_theta", "head_dim", "num_kv_heads", "tie_word_embeddings")
    for field in same:
        assert getattr(config, field) == pytest.approx(getattr(hf_config, field)), field
    _check_prefill_logits(name, model, config, {k: torch.from_numpy(v) for k, v in weights.items()})


def test_gguf_greedy_matches_transformers(family, gguf_file, reference):
    if family[0] == "qwen3":
        pytest.skip("refused above")
    llm = LLM(model=str(gguf_file), dtype="float32", kv_cache_memory=32 << 20, max_num_batched_tokens=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference


# ---------------------------------------------------------------- what is refused, by name

_BASE = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"model_type": "falcon"}, "unsupported model_type 'falcon'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
        ({"model_type": "qwen3", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
        ({"model_type": "gemma2", "hidden_activation": "relu"}, "hidden activation 'relu'"),
        ({"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"], "sliding_window": 8},
         "chunked_attention"),
        ({"model_type": "llama", "sliding_window": 4096}, "sliding_window in a llama config"),
        ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0]}}, "longrope scaling needs"),
        ({"model_type": "gemma3", "text_config": {}}, "multimodal"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(fields, message):
    from treebatch.models.loader import config_from_hf

    with pytest.raises(ValueError, match=message):
        config_from_hf({**_BASE, **fields})
