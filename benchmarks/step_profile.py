"""Where a treebatch run's time goes: seconds per part of the step, summed over one workload.

    .venv/bin/python benchmarks/step_profile.py --workload nosharing --dtype bfloat16 [--full]
        [--model-shape llama-1b]

Loads the engine as the suite does, runs the workload once untimed (warm-up), then again with
timers around the step's parts: each projection kernel (treebatch's own GEMM, oneDNN packed,
torch's plain GEMM) by projection, the C decode and cascade kernels, the other attention
(prefill through torch's fused kernel, gathers), the fused layer ops, the sampler, and the rest
of the step (Python, tensor bookkeeping). Each part counts its own seconds less those of the
parts inside it, so they add up to the run's seconds with "rest" the remainder.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from shapes import SHAPES, build_shape  # noqa: E402
from workloads import WORKLOADS, load_tokenizer  # noqa: E402

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_children = [0.0]  # seconds spent in timed calls inside the timed call now running


def timed(name, function):
    """`function` with its seconds, less those of timed calls inside it, added to
    SECONDS[name(args)] (so the parts add up without counting anything twice)."""

    def wrapper(*args, **kwargs):
        outer = _children[0]
        _children[0] = 0.0
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - began
            label = name(*args, **kwargs) if callable(name) else name
            SECONDS[label] += elapsed - _children[0]
            CALLS[label] += 1
            _children[0] = outer + elapsed

    return wrapper


def instrument() -> None:
    from treebatch.layers import attention, linear, native
    from treebatch.models import decoder
    from treebatch.runtime import sampler

    def projection_kernel(self, x, *args, **kwargs):
        rows = x.shape[0]
        if self.panels is not None and rows <= self.native_max_rows:
            kernel = "own gemm"
        elif self.packed is not None and rows <= self.packed_max_rows:
            kernel = "oneDNN packed"
        else:
            kernel = "torch gemm"
        size = "head" if self.out_features > 20000 else f"{self.in_features}->{self.out_features}"
        band = "decode-size (<=64 rows)" if rows <= 64 else "prefill-size (>64 rows)"
        return f"projection {size}, {kernel}, {band}"

    linear.Linear.__call__ = timed(projection_kernel, linear.Linear.__call__)
    linear.Linear.float32_out = timed(projection_kernel, linear.Linear.float32_out)
    # The gated MLP's projection with its activation (in the own kernel's epilogue where it runs
    # there; else the projection and silu_mul, each timed as itself inside it).
    linear.Linear.silu_gated = timed(lambda self, x: projection_kernel(self, x) + ", SiLU x up in it",
                                     linear.Linear.silu_gated)
    def rows_band(name):
        return lambda first, *args, **kwargs: f"C {name}, {'<=64' if first.shape[0] <= 64 else '>64'} rows"

    for name in ("argmax_rows", "paged_decode_attention", "cascade_decode_groups", "cascade_decode_table", "chunk_attention",
                 "chunk_attention_parts", "chunk_attention_table", "lay_out_tiles", "add_rms_norm", "silu_mul",
                 "rope_store"):
        wrapped = timed(rows_band(name), getattr(native, name))
        setattr(native, name, wrapped)
        for module in (attention, decoder, sampler):
            if hasattr(module, name):
                setattr(module, name, wrapped)
    decoder.paged_attention = timed("attention (other than the parts below)", attention.paged_attention)
    for name in ("folded_attention_with_lse", "merge_attention", "gather_blocks", "_prefix_kv"):
        setattr(attention, name, timed(f"attention: {name}", getattr(attention, name)))
    attention.F = _TimedFunctional(attention.F)
    sampler.Sampler.sample = timed("sampler", sampler.Sampler.sample)


class _TimedFunctional:
    """torch.nn.functional with scaled_dot_product_attention timed (prefill chunks' attention)."""

    def __init__(self, functional) -> None:
        self._functional = functional
        self.scaled_dot_product_attention = timed("attention: prefill chunks' SDPA",
                                                  functional.scaled_dot_product_attention)

    def __getattr__(self, name):
        return getattr(self._functional, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="nosharing", choices=sorted(WORKLOADS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default=None)
    args = parser.parse_args()

    from treebatch import LLM, SamplingParams

    workload = WORKLOADS[args.workload]
    prompts = workload.prompts(load_tokenizer(), full=args.full)
    model = str(build_shape(args.model_shape)) if args.model_shape else None
    llm = LLM(model=model, dtype=args.dtype) if model else LLM(dtype=args.dtype)
    params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, params, use_tqdm=False)  # warm-up: kernels built, caches touched
    instrument()
    began = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    total = time.perf_counter() - began
    print(f"{args.workload}{' (full)' if args.full else ''}, {args.dtype}, "
          f"{args.model_shape or 'smollm2-135m'}: {total:.2f} s, {len(prompts)} prompts")
    for label, seconds in sorted(SECONDS.items(), key=lambda item: -item[1]):
        print(f"  {seconds:7.3f} s  {100 * seconds / total:5.1f}%  {CALLS[label]:6d} calls  {label}")
    rest = total - sum(SECONDS.values())
    print(f"  {rest:7.3f} s  {100 * rest / total:5.1f}%                rest of the step")


if __name__ == "__main__":
    main()
