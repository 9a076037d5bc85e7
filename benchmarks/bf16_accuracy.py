"""How close bfloat16 stays to float32: teacher-forced next-token agreement on real text.

    .venv/bin/python benchmarks/bf16_accuracy.py [--tokens 4096] [--window 512] [--out BENCHMARKS.md]

The text is the Python language reference shipped with Python (`pydoc_data.topics`), tokenized
with the default model's tokenizer and cut into windows. At every position of every window the
float32 reference (transformers, the default model dequantized by its own GGUF loader) predicts
the next token; the figure is the share of positions where another run's top token is the same:
treebatch in float32 (should be ~100%), treebatch in bfloat16, and transformers in bfloat16 on
the same weights. treebatch runs each window as one prefill chunk through its own model
(`ModelRunner.model.forward` with every row's logits), so the projections, attention and norms
are the engine's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_between  # noqa: E402

BEGIN, END = "<!-- bf16-accuracy:begin -->", "<!-- bf16-accuracy:end -->"


def windows(tokenizer, num_tokens: int, window: int) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text).input_ids[:num_tokens]
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def treebatch_logits(llm, ids: list[int]) -> torch.Tensor:
    from treebatch.core.outputs import ScheduledChunk
    from treebatch.core.step_layout import StepLayout
    from treebatch.runtime.step_inputs import build_step_inputs

    engine = llm.engine
    kv = engine.scheduler.kv
    blocks = kv.pool.allocate(-(-len(ids) // kv.block_size))
    try:
        chunk = ScheduledChunk("probe", ids, 0, blocks, needs_sample=True, num_output_tokens=0)
        input_ids, positions, _, metadata = build_step_inputs(StepLayout([], [chunk]), kv.block_size)
        with torch.inference_mode():
            return engine.runner.model.forward(input_ids, positions, metadata, engine.runner.kv_cache,
                                               torch.arange(len(ids)))
    finally:
        kv.pool.release(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from treebatch import LLM
    from treebatch.host import cpu_model
    from treebatch.models.default import default_model_path

    path = default_model_path()
    hf32 = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    ours = {dtype: LLM(dtype=dtype, max_num_batched_tokens=256, kv_cache_memory=256 << 20)
            for dtype in ("float32", "bfloat16")}
    texts = windows(ours["float32"].tokenizer, args.tokens, args.window)
    agree = {"treebatch float32": 0, "treebatch bfloat16": 0, "transformers bfloat16": 0}
    total = 0
    for ids in texts:
        with torch.inference_mode():
            reference = hf32(torch.tensor([ids])).logits[0].argmax(-1)
            agree["transformers bfloat16"] += int((hf16(torch.tensor([ids])).logits[0].argmax(-1) == reference).sum())
        for dtype, llm in ours.items():
            agree[f"treebatch {dtype}"] += int((treebatch_logits(llm, ids).argmax(-1) == reference).sum())
        total += len(ids)
    rows = ["| run | positions agreeing with the float32 reference | share |", "|---|---:|---:|"]
    rows += [f"| {name} | {count:,} of {total:,} | {count / total:.2%} |" for name, count in agree.items()]
    command = "python benchmarks/bf16_accuracy.py " + " ".join(sys.argv[1:])
    text = (f"Command: `{command.strip()}` ({cpu_model()}); {len(texts)} windows of up to {args.window} tokens of "
            "the Python language reference, teacher-forced; reference: transformers in float32.\n\n" + "\n".join(rows))
    print(text)
    if args.out:
        replace_between(args.out, BEGIN, END, text, heading="## bf16 accuracy against float32")


if __name__ == "__main__":
    main()
