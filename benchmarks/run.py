"""Whole-batch benchmark: treebatch against peer engines on fixed token-id workloads.

    .venv/bin/python benchmarks/run.py [--workload mixed] [--engines treebatch,hf_generate] [--out BENCHMARKS.md]

Every engine runs in its own subprocess (`--worker`), so thread pools and memory never mix and
an engine may later come from another venv. Each worker writes a JSON result; the parent
checks token counts, compares greedy outputs with treebatch, prints a markdown table, saves
the JSON under benchmarks/results/ and writes the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # workloads/engines/report import as plain modules, run as a script

from report import machine_facts, markdown_table, write_record  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """Child process: build the workload, run one engine, write its JSON result."""
    from engines import ENGINES
    from workloads import load_tokenizer

    workload = WORKLOADS[args.workload]
    prompts = workload.prompts(load_tokenizer())
    options: dict[str, Any] = {"hf_batch_size": args.hf_batch_size, "hf_sort": args.hf_sort}
    load_before = os.getloadavg()[0]
    seconds, outputs = ENGINES[args.worker](prompts, workload.max_tokens, options)
    prompt_tokens = sum(len(p) for p in prompts)
    generated = sum(len(o) for o in outputs)
    result = {
        "engine": args.worker,
        "workload": workload.name,
        "requests": len(prompts),
        "seconds": round(seconds, 3),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "generated_tokens_per_s": round(generated / seconds, 2),
        "total_tokens_per_s": round((prompt_tokens + generated) / seconds, 2),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "all_lengths_exact": all(len(o) == workload.max_tokens for o in outputs),
        "options": options,
        "outputs": outputs,
    }
    Path(args.result_file).write_text(json.dumps(result))


def run_engine(engine: str, workload: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    result_file = folder / f"{workload}-{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--workload", workload,
           "--result-file", str(result_file), "--hf-batch-size", str(args.hf_batch_size)]
    cmd.append("--hf-sort" if args.hf_sort else "--no-hf-sort")
    print(f"[{workload}] {engine} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads(result_file.read_text())
    if not result["all_lengths_exact"]:
        raise SystemExit(f"{engine} on {workload}: not every request generated {WORKLOADS[workload].max_tokens} tokens")
    print(f"[{workload}] {engine}: {result['seconds']} s, {result['generated_tokens_per_s']} gen tok/s",
          file=sys.stderr, flush=True)
    return result


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """How many greedy sequences are identical, and the mean length of the common prefix
    (float32 kernels differ, so a near-tie can flip one token and the rest after it)."""
    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    prefixes = [common(a, b) for a, b in zip(reference, other)]
    return {"identical": sum(a == b for a, b in zip(reference, other)), "of": len(reference),
            "mean_common_prefix": round(sum(prefixes) / max(len(prefixes), 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="mixed", help=f"comma list of {', '.join(WORKLOADS)} or 'all'")
    parser.add_argument("--engines", default="treebatch,hf_generate")
    parser.add_argument("--out", default=None, help="markdown record to update, e.g. BENCHMARKS.md")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--hf-sort", action=argparse.BooleanOptionalAction, default=True,
                        help="batch HF prompts sorted by length (default; less padding for the peer)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    workloads = [w for w in WORKLOADS if w != "smoke"] if args.workload == "all" else args.workload.split(",")
    engines = args.engines.split(",")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            runs[workload] = {e: run_engine(e, workload, args, Path(tmp)) for e in engines}
            if "treebatch" in runs[workload]:
                reference = runs[workload]["treebatch"]["outputs"]
                for engine, result in runs[workload].items():
                    if engine != "treebatch":
                        result["agreement_with_treebatch"] = agreement(reference, result["outputs"])
    for per_engine in runs.values():
        for result in per_engine.values():
            del result["outputs"]  # kept out of the saved JSON: big and not needed later

    command = " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]])
    record = {"command": command, "started": started, "machine": machine_facts(),
              "workloads": {w: WORKLOADS[w].description for w in workloads}, "runs": runs}
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results_dir / f"{stamp}-{'_'.join(workloads)}.json").write_text(json.dumps(record, indent=2) + "\n")

    table = markdown_table(runs)
    print(table)
    if args.out:
        write_record(Path(args.out), record, table)


if __name__ == "__main__":
    main()
