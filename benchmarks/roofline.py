"""Roofline: the machine's measured matrix-multiply peak (float32 or bfloat16), and the FLOPs a batch truly needs.

    .venv/bin/python benchmarks/roofline.py          # measure the peak, print JSON (about 5-10 s)

run.py and ablation.py run this file as its own short process before any engine starts (one
torch process at a time), then divide each row's needed FLOPs by its seconds and by the peak.

What a batch truly needs (every engine is charged the same work, whatever it computes):

- decoder body: 2 x (linear weights of the decoder layers) FLOPs per token that passes through
  the layers: each unique prompt token (the nodes of the batch's token-level prefix trie, so a
  shared prefix counts once) and each generated token except every request's last (it is
  sampled, never fed back);
- vocabulary head: 2 x vocab x hidden FLOPs per logits row: each request's last prompt token
  and its generated tokens except the last, i.e. max_tokens rows per request; prompt tokens
  other than each prompt's last need no logits; the input embedding is a lookup (0 FLOPs);
- attention: 4 x heads x head_dim x context FLOPs per token per layer (QK^T and PV, a
  multiply-add each), context = the token's position (1-based; the keys it attends, itself
  included), summed over the same tokens as the body;
- norms, rotary, activations and sampling are left out (well under 1% here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def measure_peak(sizes: tuple[int, ...] = (2048, 3072), budget_s: float = 8.0, dtype: str = "float32") -> dict[str, Any]:
    """Best GFLOP/s of `torch.mm` in `dtype` on square matrices, threads = one per core.

    Each size is warmed up once, then repeated (at least twice) while the time budget lasts;
    the best single run over all sizes is the peak."""
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    began = time.perf_counter()
    per_size: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(getattr(torch, dtype))
        b = torch.randn(n, n).to(getattr(torch, dtype))
        c = torch.empty(n, n, dtype=getattr(torch, dtype))
        torch.mm(a, b, out=c)  # warm-up: thread pool, MKL kernel choice, page faults
        best = float("inf")
        runs = 0
        while runs < 2 or (runs < 6 and time.perf_counter() - began < budget_s * (sizes.index(n) + 1) / len(sizes)):
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - start)
            runs += 1
        per_size[str(n)] = round(2 * n**3 / best / 1e9, 1)
    return {"peak_gflops": max(per_size.values()), "gflops_by_size": per_size, "threads": threads,
            "dtype": dtype, "seconds": round(time.perf_counter() - began, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def decoder_linear_parameters(config: Any) -> int:
    """Weights of the decoder layers' linear maps (q, k, v, o, gate, up, down): the model's
    `num_parameters` less the embeddings (and untied head) and the norm weights."""
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    norms = config.hidden_size * (2 * config.num_layers + 1)
    return config.num_parameters - embeddings - norms


def needed_flops(prompts: list[list[int]], max_tokens: int, config: Any) -> dict[str, Any]:
    """FLOPs the batch truly needs (see the module docstring), split into their parts."""
    body = decoder_linear_parameters(config)
    head = config.vocab_size * config.hidden_size
    attention_per_context = 4 * config.num_heads * config.head_dim * config.num_layers

    # Unique prompt tokens = trie nodes; a node at depth d attends d keys. In sorted order each
    # prompt adds the positions past its longest common prefix with the previous prompt.
    unique = 0
    context_sum = 0
    previous: list[int] = []
    for p in sorted(prompts):
        n = 0
        while n < min(len(p), len(previous)) and p[n] == previous[n]:
            n += 1
        unique += len(p) - n
        context_sum += (len(p) * (len(p) + 1) - n * (n + 1)) // 2  # positions n+1 .. len(p)
        previous = p
    # Generated tokens fed back: positions L+1 .. L+max_tokens-1 for a prompt of length L.
    fed = len(prompts) * max(max_tokens - 1, 0)
    for p in prompts:
        first, last = len(p) + 1, len(p) + max_tokens - 1
        if last >= first:
            context_sum += (first + last) * (last - first + 1) // 2
    logits_rows = len(prompts) * max_tokens
    parts = {
        "body": 2 * body * (unique + fed),
        "head": 2 * head * logits_rows,
        "attention": attention_per_context * context_sum,
    }
    return {"unique_prompt_tokens": unique, "fed_generated_tokens": fed, "logits_rows": logits_rows,
            "decoder_linear_parameters": body, "head_parameters": head,
            **{f"{k}_gflop": round(v / 1e9, 3) for k, v in parts.items()},
            "total_gflop": round(sum(parts.values()) / 1e9, 3)}


def roofline(seconds: float, needed: dict[str, Any], peak: dict[str, Any] | None) -> dict[str, Any]:
    """Achieved GFLOP/s (needed FLOPs over wall seconds) and its fraction of the measured peak."""
    achieved = needed["total_gflop"] / seconds
    out: dict[str, Any] = {"needed_gflop": needed["total_gflop"], "achieved_gflops": round(achieved, 2)}
    if peak and peak.get("peak_gflops"):
        out["peak_gflops"] = peak["peak_gflops"]
        out["roofline_fraction"] = round(achieved / peak["peak_gflops"], 3)
    return out


def best_peak(measurements: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The best of several peak measurements (each kept under "measurements"); None if none worked."""
    done = [m for m in measurements if m]
    if not done:
        return None
    best = dict(max(done, key=lambda m: m["peak_gflops"]))
    best["measurements"] = [{k: m[k] for k in ("peak_gflops", "loadavg_1m", "seconds")} for m in done]
    return best


def measure_peak_in_subprocess(python: str = sys.executable, dtype: str = "float32") -> dict[str, Any] | None:
    """Run this file as its own process (so its threads never overlap an engine's); None if it fails."""
    import subprocess

    done = subprocess.run([python, os.path.abspath(__file__), dtype], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"matmul peak measurement failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps(measure_peak(dtype=sys.argv[1] if len(sys.argv) > 1 else "float32")))
