"""Engine runners: each takes token-id prompts and an output length, loads its model outside
the timer, warms up, then times the whole batch. Each returns (seconds, generated token ids).

They run inside a worker subprocess (see run.py), one engine per process, so thread pools
and memory from one engine never touch another's measurement.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

Runner = Callable[[list[list[int]], int, dict[str, Any]], tuple[float, list[list[int]]]]


def run_treebatch(prompts: list[list[int]], max_tokens: int, options: dict[str, Any]) -> tuple[float, list[list[int]]]:
    from treebatch import LLM, SamplingParams

    llm = LLM()  # default config: what a user gets; threads = one per core
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # Warm-up: first calls pay one-off allocator and kernel-selection costs.
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    batch = [{"prompt_token_ids": ids} for ids in prompts]
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    options["treebatch_summary"] = llm.last_run_summary
    return seconds, [list(o.outputs[0].token_ids) for o in outputs]


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


def run_hf_generate(prompts: list[list[int]], max_tokens: int, options: dict[str, Any]) -> tuple[float, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    from treebatch.models.default import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    config = model.generation_config
    config.do_sample = False
    config.max_new_tokens = max_tokens
    config.min_new_tokens = max_tokens
    # An empty list disables the EOS stop (None falls back to the model's EOS): exactly N tokens.
    config.eos_token_id = []
    config.pad_token_id = 0
    batch_size = int(options.get("hf_batch_size", 16))

    order = list(range(len(prompts)))
    if options.get("hf_sort", True):
        # Similar lengths share a batch, so less padding: the kinder choice for the peer.
        order.sort(key=lambda i: len(prompts[i]))

    _hf_batch(model, [prompts[0][:16]], 2, 0)  # warm-up, as for treebatch (max_new_tokens stays N)
    results: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        for index, tokens in zip(chunk, _hf_batch(model, [prompts[i] for i in chunk], max_tokens, 0)):
            results[index] = tokens
    seconds = time.perf_counter() - start
    return seconds, results


ENGINES: dict[str, Runner] = {"treebatch": run_treebatch, "hf_generate": run_hf_generate}
