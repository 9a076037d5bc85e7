"""How close the cost model's prediction comes to the measured run, per batch.

    .venv/bin/python benchmarks/cost_model_accuracy.py [--workload all|docqa,...] [--full] [--no-real-text]
                                                       [--out BENCHMARKS.md]

For each batch one engine (`LLM(trace_file=...)`, default config) first predicts, then runs it:

- the suite workloads (benchmarks/workloads.py): `LLMEngine.predict` on the token ids, then
  `generate` (greedy, ignore_eos, every request to max_tokens, as the prediction assumes);
- two real-text batch files, run as a new user would, through the command line in this process:
  `treebatch plan --json --predict`, then `treebatch run --trace-file`. Their text is paragraphs
  of the Python language reference that ships with Python (`pydoc_data.topics`): "questions per
  document" (chat, 4 questions on each of 16 paragraphs, temperature 0.7, up to 64 tokens) and
  "few-shot labelling" (completions, one long instruction with 6 labelled examples, then 160
  sentences to label, greedy, up to 4 tokens, stop at a newline). Outputs there stop at EOS or a
  stop string, so beside the plan's prediction (every request to max_tokens) the table gives the
  prediction for the lengths the run produced.

Each batch runs `--rounds` times (default 3) and the median round is reported, with the range:
on two shared cores one run differs from the next by up to 20%. "measured" is the sum of the
step trace's `step_time_s` (the engine's steps); "wall" adds
tokenization, planning, detokenization and file writing. Results: JSON under benchmarks/results/,
markdown between the cost-model markers of --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_between  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

BEGIN, END = "<!-- cost-model:begin -->", "<!-- cost-model:end -->"
QUESTIONS = (
    "Summarize this passage in one sentence.",
    "Which Python feature does this passage describe?",
    "Name one rule or condition the passage states.",
    "Would a beginner find this passage hard? Answer yes or no, then say why.",
)
LABELS = ("syntax", "semantics", "runtime", "data model", "library")
EXAMPLES = (
    ("A decorator expression is evaluated when the function definition is executed.", "semantics"),
    ("The grammar allows a trailing comma after the last argument.", "syntax"),
    ("The interpreter raises RecursionError when the stack grows too deep.", "runtime"),
    ("Every object has an identity, a type and a value.", "data model"),
    ("The json module converts between strings and Python objects.", "library"),
    ("String literals may be enclosed in matching single or double quotes.", "syntax"),
)


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        for part in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(part.split())
            if 40 <= len(text.split()) <= 150 and text.count(". ") >= 2 and not re.search(r">>>|::=|\*\*", text):
                found.append(text)
    return found


def real_text_batches(folder: Path) -> dict[str, Path]:
    texts = paragraphs()
    questions = folder / "questions_per_document.jsonl"
    with questions.open("w") as f:
        for d, text in enumerate(texts[:16]):
            for q, question in enumerate(QUESTIONS):
                body = {
                    "messages": [
                        {"role": "system", "content": "You answer questions about Python's documentation briefly."},
                        {"role": "user", "content": f"Passage:\n{text}\n\nQuestion: {question}"},
                    ],
                    "max_tokens": 64,
                    "temperature": 0.7,
                }
                f.write(json.dumps({"custom_id": f"d{d}q{q}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    sentences = [s for text in texts[16:] for s in re.split(r"(?<=\.) ", text) if len(s.split()) >= 6][:160]
    instruction = (
        "Label each sentence from the Python language reference with exactly one of: "
        + ", ".join(LABELS) + ".\n\n" + "".join(f"Sentence: {s}\nLabel: {label}\n\n" for s, label in EXAMPLES)
    )
    labelling = folder / "few_shot_labelling.jsonl"
    with labelling.open("w") as f:
        for i, sentence in enumerate(sentences):
            body = {"prompt": f"{instruction}Sentence: {sentence}\nLabel:", "max_tokens": 4, "temperature": 0, "stop": ["\n"]}
            f.write(json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return {"questions_per_document": questions, "few_shot_labelling": labelling}


class Trace:
    """The engine's step trace: seconds of the steps written since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = 0

    def new_seconds(self) -> tuple[float, int]:
        lines = self.path.read_text().splitlines()
        steps = [json.loads(line) for line in lines[self.seen :]]
        self.seen = len(lines)
        return sum(s["step_time_s"] for s in steps), len(steps)


def run_workload(llm: Any, trace: Trace, name: str, full: bool, rounds: int) -> dict[str, Any]:
    from treebatch import SamplingParams

    workload = WORKLOADS[name]
    prompts = workload.prompts(llm.tokenizer, full)
    predicted = llm.engine.predict(prompts, [workload.max_tokens] * len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=workload.max_tokens, ignore_eos=True)

    def once() -> tuple[float, int, float]:
        trace.new_seconds()
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        return (*trace.new_seconds(), wall)

    return {"batch": name, "requests": len(prompts), "predicted_s": predicted["predicted_seconds"],
            "predicted_steps": predicted["num_steps"], **rounds_of(once, rounds)}


def rounds_of(once: Any, rounds: int) -> dict[str, Any]:
    """The median round (by step-trace seconds) of `rounds` runs, and the range: one run on two
    shared cores varies by up to 20% from the next."""
    runs = sorted(once() for _ in range(rounds))
    measured, steps, wall = runs[len(runs) // 2]
    return {"measured_s": measured, "measured_range_s": [runs[0][0], runs[-1][0]], "steps": steps, "wall_s": wall}


def run_batch_file(llm: Any, trace: Trace, name: str, path: Path, folder: Path, rounds: int) -> dict[str, Any]:
    from treebatch import cli
    from treebatch.batch.prompts import PromptTokenizer, prepare_window
    from treebatch.batch.reader import read_batch, without_errors

    def factory(**_: Any) -> Any:
        return llm

    plan_json = folder / f"{name}.plan.json"
    with plan_json.open("w") as f, _stdout_to(f):
        assert cli.main(["plan", str(path), "--json", "--predict"], llm_factory=factory) == 0
    planned = json.loads(plan_json.read_text())
    output = folder / f"{name}.out.jsonl"

    def once() -> tuple[float, int, float]:
        trace.new_seconds()
        start = time.perf_counter()
        assert cli.main(["run", str(path), "-o", str(output), "--overwrite"], llm_factory=factory) == 0
        wall = time.perf_counter() - start
        return (*trace.new_seconds(), wall)

    measured = rounds_of(once, rounds)
    # The prediction again, for the output lengths this run produced.
    lengths = {}
    for line in output.read_text().splitlines():
        record = json.loads(line)
        lengths[record["custom_id"]] = max(1, record["response"]["body"]["usage"]["completion_tokens"])
    ready = without_errors(prepare_window(without_errors(list(read_batch(path)), lambda e: None),
                                          PromptTokenizer.of(llm)), lambda e: None)
    prompts = [r.token_ids.tolist() for r in ready for _ in range(r.params.n)]
    actual = llm.engine.predict(prompts, [lengths[r.entry.custom_id] for r in ready for _ in range(r.params.n)])
    return {"batch": name, "requests": len(ready), "predicted_s": planned["predicted_seconds"],
            "predicted_actual_lengths_s": actual["predicted_seconds"], "predicted_steps": actual["num_steps"],
            **measured}


class _stdout_to:
    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> None:
        self.saved, sys.stdout = sys.stdout, self.f

    def __exit__(self, *exc: Any) -> None:
        sys.stdout = self.saved


def table(rows: list[dict[str, Any]], command: str, cpu: str) -> str:
    out = [
        f"Command: `{command}` ({cpu}).", "",
        "| batch | requests | predicted s (plan) | predicted s (actual lengths) | measured s (step trace, median) "
        "| measured range s | predicted / measured | steps (predicted, run) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        basis = r.get("predicted_actual_lengths_s", r["predicted_s"])
        actual = f"{r['predicted_actual_lengths_s']:.2f}" if "predicted_actual_lengths_s" in r else "(= plan)"
        out.append(
            f"| {r['batch']} | {r['requests']} | {r['predicted_s']:.2f} | {actual} | {r['measured_s']:.2f} "
            f"| {r['measured_range_s'][0]:.2f}-{r['measured_range_s'][1]:.2f} "
            f"| {basis / r['measured_s']:.2f} | {r['predicted_steps']}, {r['steps']} | {r['wall_s']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--no-real-text", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="runs per batch; the median is reported")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from treebatch import LLM
    from treebatch.host import cpu_model

    names = ["docqa", "gsp", "batchllm_micro", "nosharing"] if args.workload == "all" else args.workload.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = Trace(folder / "steps.jsonl")
        llm = LLM(trace_file=str(trace.path))
        rows = [run_workload(llm, trace, name, args.full, args.rounds) for name in names]
        if not args.no_real_text:
            for name, path in real_text_batches(folder).items():
                rows.append(run_batch_file(llm, trace, name, path, folder, args.rounds))
    command = "python benchmarks/cost_model_accuracy.py " + " ".join(sys.argv[1:])
    text = table(rows, command.strip(), cpu_model())
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"{stamp}-cost-model.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.out is not None:
        replace_between(args.out, BEGIN, END, text, heading="## Cost model accuracy")


if __name__ == "__main__":
    main()
