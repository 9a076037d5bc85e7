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

    workload = WORKLOADS[args.workload]
    # Prompts come from the parent (built once, in the main venv), so engines in other venvs
    # get exactly the same token ids without importing treebatch.
    prompts = json.loads(Path(args.prompts_file).read_text())
    options: dict[str, Any] = {"hf_batch_size": args.hf_batch_size, "hf_sort": args.hf_sort,
                               "hf_model_folder": str(args.hf_model_folder)}
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


def engine_python(engine: str) -> str:
    """The interpreter for an engine's worker: the main venv's, or the engine's own venv."""
    from engines import ENGINE_PYTHON

    if engine not in ENGINE_PYTHON:
        return sys.executable
    python = HERE.parent / ENGINE_PYTHON[engine]
    if not python.exists():
        raise SystemExit(f"{engine}: {python} not found; create it with `bash benchmarks/setup_vllm.sh`")
    return str(python)


def run_engine(engine: str, workload: str, args: argparse.Namespace, folder: Path,
               prompts_file: Path) -> dict[str, Any]:
    result_file = folder / f"{workload}-{engine}.json"
    cmd = [engine_python(engine), str(Path(__file__).resolve()), "--worker", engine, "--workload", workload,
           "--result-file", str(result_file), "--prompts-file", str(prompts_file),
           "--hf-batch-size", str(args.hf_batch_size), "--hf-model-folder", str(args.hf_model_folder)]
    cmd.append("--hf-sort" if args.hf_sort else "--no-hf-sort")
    print(f"[{workload}] {engine} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(result_file.read_text())
    # Whole worker process minus the timed part: imports, model load, warm-up, teardown.
    result["untimed_seconds"] = round(time.perf_counter() - began - result["seconds"], 1)
    if not result["all_lengths_exact"]:
        raise SystemExit(f"{engine} on {workload}: not every request generated {WORKLOADS[workload].max_tokens} tokens")
    print(f"[{workload}] {engine}: {result['seconds']} s, {result['generated_tokens_per_s']} gen tok/s "
          f"(+{result['untimed_seconds']} s untimed)",
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
    parser.add_argument("--hf-model-folder", type=Path, default=HERE / ".model-hf",
                        help="where the default model is exported as a HF folder for vLLM (gitignored)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    workloads = [w for w in WORKLOADS if w != "smoke"] if args.workload == "all" else args.workload.split(",")
    engines = args.engines.split(",")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    from engines import ENGINE_PYTHON, export_hf_model
    from workloads import load_tokenizer, trie_size

    if any(e in ENGINE_PYTHON for e in engines):
        export_hf_model(args.hf_model_folder)
    tokenizer = load_tokenizer()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    described: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            prompts = WORKLOADS[workload].prompts(tokenizer)
            prompts_file = Path(tmp) / f"{workload}-prompts.json"
            prompts_file.write_text(json.dumps(prompts))
            logical, unique = sum(len(p) for p in prompts), trie_size(prompts)
            described[workload] = (f"{WORKLOADS[workload].description}. {len(prompts)} prompts, "
                                   f"{logical:,} logical prompt tokens, {unique:,} unique (prefix-trie) tokens "
                                   f"({logical / unique:.1f}x)")
            runs[workload] = {e: run_engine(e, workload, args, Path(tmp), prompts_file) for e in engines}
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
              "workloads": described, "runs": runs}
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
