"""What structured outputs cost: constrained batches against the same batches unconstrained.

    .venv/bin/python benchmarks/structured_outputs.py [--labels 256] [--documents 96] [--rounds 2] [--out BENCHMARKS.md]

Two workloads on the default model, greedy:
- `labelling`: `--labels` reviews under one shared few-shot prefix, each answered with one of 5
  labels (`choice`);
- `extraction`: `--documents` invoices, each extracted into one JSON schema.

Variants, alternating for `--rounds` rounds (so drift hits all alike), each timed around one
`generate` of the whole batch:
- `constrained`: the constraint, jump-forward on (the default);
- `constrained, no jump-forward`: every token sampled, one decode step each;
- `unconstrained`: no constraint, each request asked for exactly as many tokens as its
  constrained answer has (`max_tokens` = that length, `ignore_eos`), so the same tokens are
  computed and only the constraint differs.
Prints, and with `--out` appends to the benchmark record: seconds (median), steps, forced and
generated tokens, the seconds inside the grammar work (mask filling and applying, matcher
advance), and the ratio to unconstrained. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

LABELS = ["positive", "negative", "neutral", "mixed", "off-topic"]
SCHEMA = {
    "type": "object",
    "properties": {
        "invoice": {"type": "integer", "minimum": 1000, "maximum": 99999},
        "vendor": {"type": "string", "maxLength": 32},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 24}, "quantity": {"type": "integer", "minimum": 1},
                               "price": {"type": "number", "minimum": 0}},
                "required": ["name", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["invoice", "vendor", "currency", "items", "paid"],
    "additionalProperties": False,
}


def labelling_prompts(count: int) -> list[str]:
    things = ["the hotel", "this phone", "the delivery", "our guide", "the soup", "the app", "the seats", "the battery"]
    verdicts = ["was great", "broke after a day", "was fine, I guess", "was good but slow", "reminded me of football",
                "exceeded every hope", "never arrived", "smelled odd"]
    shots = "".join(
        f"Review: {things[i]} {verdicts[(3 * i) % 8]}.\nLabel: {LABELS[i % 5]}\n\n" for i in range(8)
    )
    head = f"Label each review as one of: {', '.join(LABELS)}.\n\n{shots}"
    return [f"{head}Review: {things[i % 8]} {verdicts[(i // 8) % 8]} (case {i}).\nLabel:" for i in range(count)]


def extraction_prompts(count: int) -> list[str]:
    vendors = ["ACME Tools", "Blue Harbor Ltd", "Nordlicht GmbH", "Casa Verde", "Kite & Co", "Orbit Foods"]
    goods = ["hammer", "rope", "lamp", "coffee", "paper", "cable", "glue", "chair"]
    docs = []
    for i in range(count):
        lines = [f"{1 + (i + k) % 5} x {goods[(i + 3 * k) % 8]} at {3 + (7 * i + k) % 90}.{(13 * i) % 100:02d}"
                 for k in range(1 + i % 3)]
        docs.append(
            f"Invoice no. {1000 + 37 * i} from {vendors[i % 6]}, currency {['EUR', 'USD', 'GBP'][i % 3]}.\n"
            + "\n".join(lines) + f"\nStatus: {'paid' if i % 2 else 'open'}.\n\nThe invoice as JSON:"
        )
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=256)
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from treebatch import LLM, SamplingParams
    from method_timer import time_methods  # beside this script

    from treebatch.runtime.sampler import Sampler
    from treebatch.structured_outputs import StructuredOutputsParams

    inside = time_methods(Sampler, ("_apply_grammars", "_advance"))  # seconds in the grammar work

    engines = {True: LLM(dtype="float32"), False: LLM(dtype="float32", enable_jump_forward=False)}
    workloads = {
        "labelling": (labelling_prompts(args.labels), StructuredOutputsParams(choice=LABELS), 8),
        "extraction": (extraction_prompts(args.documents), StructuredOutputsParams(json=SCHEMA), 160),
    }
    rows = []
    for name, (prompts, constraint, max_tokens) in workloads.items():
        constrained = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=constraint)
        for llm in engines.values():  # untimed: kernels built, the grammar compiled, caches warm
            llm.generate(prompts[:4], constrained, use_tqdm=False)
        lengths: list[int] | None = None
        results: dict[str, list[tuple[float, dict, float]]] = {}
        for round_index in range(args.rounds):
            order = ["constrained", "constrained, no jump-forward", "unconstrained"]
            for variant in order if round_index % 2 == 0 else order[::-1]:
                if variant == "unconstrained":  # round 0 runs "constrained" first: lengths are known
                    assert lengths is not None
                    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
                    llm = engines[True]
                else:
                    params = constrained
                    llm = engines[variant == "constrained"]
                inside[0] = 0.0
                began = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - began
                results.setdefault(variant, []).append((seconds, dict(llm.last_run_summary), inside[0]))
                if variant == "constrained":
                    lengths = [len(o.outputs[0].token_ids) for o in outputs]
                print(f"{name:10s} {variant:30s} {seconds:7.2f} s  steps {llm.last_run_summary['steps']}", flush=True)
        base = statistics.median(s for s, _, _ in results["unconstrained"])
        for variant, runs in results.items():
            seconds = statistics.median(s for s, _, _ in runs)
            summary = runs[-1][1]
            rows.append((name, len(prompts), variant, [s for s, _, _ in runs], seconds / base, summary["steps"],
                         summary["forced_tokens"], summary["generated_tokens"], statistics.median(g for _, _, g in runs)))
    table = [
        "| workload | requests | variant | run seconds (rounds) | time / unconstrained | steps | forced tokens | generated tokens | seconds in grammar work |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, count, variant, seconds, ratio, steps, forced, generated, grammar in rows:
        runs = ", ".join(f"{s:.2f}" for s in seconds)
        table.append(f"| {name} | {count} | {variant} | {runs} | {ratio:.3f} | {steps} | {forced} | {generated} | {grammar:.2f} |")
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        command = (f"python benchmarks/structured_outputs.py --labels {args.labels} --documents {args.documents} "
                   f"--rounds {args.rounds}")
        cpu = _cpu_name()
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n## Structured outputs: constrained against unconstrained\n\nCommand: `{command}` "
                    f"({cpu}, 2 cores, {time.strftime('%Y-%m-%d')}; greedy, float32, the default model).\n\n{text}\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
