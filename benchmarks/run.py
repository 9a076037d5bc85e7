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
    """Child process: load one engine once (untimed), run every workload, write JSON results."""
    from engines import ENGINES

    began = time.perf_counter()
    options: dict[str, Any] = {"hf_batch_size": args.hf_batch_size, "hf_sort": args.hf_sort,
                               "hf_model_folder": str(args.hf_model_folder)}
    generate = ENGINES[args.worker](options)
    load_seconds = time.perf_counter() - began
    results = {}
    for name in args.workload.split(","):
        workload = WORKLOADS[name]
        # Prompts come from the parent (built once, in the main venv), so engines in other venvs
        # get exactly the same token ids without importing treebatch.
        prompts = json.loads((Path(args.prompts_dir) / f"{name}.json").read_text())
        info: dict[str, Any] = dict(options)
        load_before = os.getloadavg()[0]
        seconds, outputs = generate(prompts, workload.max_tokens, info)
        prompt_tokens = sum(len(p) for p in prompts)
        generated = sum(len(o) for o in outputs)
        results[name] = {
            "engine": args.worker,
            "workload": name,
            "requests": len(prompts),
            "seconds": round(seconds, 3),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
            "generated_tokens_per_s": round(generated / seconds, 2),
            "total_tokens_per_s": round((prompt_tokens + generated) / seconds, 2),
            "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "all_lengths_exact": all(len(o) == workload.max_tokens for o in outputs),
            "engine_start_seconds": round(load_seconds, 1),
            "options": info,
            "outputs": outputs,
        }
        print(f"[{name}] {args.worker}: {seconds:.1f} s, {generated / seconds:.1f} gen tok/s "
              f"(engine start {load_seconds:.0f} s, untimed)", file=sys.stderr, flush=True)
        Path(args.result_file).write_text(json.dumps(results))


def engine_command(engine: str) -> tuple[str, dict[str, str]]:
    """The interpreter for an engine's worker (the main venv's, or the engine's own venv) and
    its environment (libraries the engine wants preloaded)."""
    from engines import ENGINE_PRELOAD, ENGINE_PYTHON

    env = dict(os.environ)
    if engine not in ENGINE_PYTHON:
        return sys.executable, env
    python = HERE.parent / ENGINE_PYTHON[engine]
    if not python.exists():
        raise SystemExit(f"{engine}: {python} not found; create it with `bash benchmarks/setup_vllm.sh`")
    preload = [str(HERE.parent / lib) for lib in ENGINE_PRELOAD.get(engine, []) if (HERE.parent / lib).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [p for p in [env.get("LD_PRELOAD")] if p])
    return str(python), env


def run_engine(engine: str, workloads: list[str], args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Any]]:
    """One worker process for `engine` over all workloads; results per workload."""
    result_file = folder / f"result-{engine}.json"
    python, env = engine_command(engine)
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--workload", ",".join(workloads),
           "--result-file", str(result_file), "--prompts-dir", str(folder),
           "--hf-batch-size", str(args.hf_batch_size), "--hf-model-folder", str(args.hf_model_folder)]
    cmd.append("--hf-sort" if args.hf_sort else "--no-hf-sort")
    print(f"{engine}: {', '.join(workloads)} ...", file=sys.stderr, flush=True)
    logs = HERE / "results" / "logs"  # gitignored; the last run's worker output per engine
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{engine}.txt"
    with open(log, "w") as out:  # engines' own chatter (vLLM logs a lot) goes to a file
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"{engine} worker failed (exit {done.returncode})")
    for line in log.read_text().splitlines():
        if line.startswith("[") and f"] {engine}: " in line:
            print(line, file=sys.stderr, flush=True)
    results = json.loads(result_file.read_text())
    for name, result in results.items():
        if not result["all_lengths_exact"]:
            raise SystemExit(f"{engine} on {name}: not every request generated {WORKLOADS[name].max_tokens} tokens")
    return results


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
    parser.add_argument("--full", action="store_true",
                        help="published workload sizes instead of the 2-core scaled ones (slow)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    # 'all': the suite (docqa, gsp, batchllm_micro, nosharing); `mixed` and `smoke` run by name.
    workloads = [w for w in WORKLOADS if w not in ("smoke", "mixed")] if args.workload == "all" else args.workload.split(",")
    engines = args.engines.split(",")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    from engines import ENGINE_PYTHON, export_hf_model
    from workloads import load_tokenizer, trie_size

    if any(e in ENGINE_PYTHON for e in engines):
        export_hf_model(args.hf_model_folder)
    tokenizer = load_tokenizer()
    runs: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in workloads}
    described: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            prompts = WORKLOADS[workload].prompts(tokenizer, full=args.full)
            (Path(tmp) / f"{workload}.json").write_text(json.dumps(prompts))
            logical, unique = sum(len(p) for p in prompts), trie_size(prompts)
            text = WORKLOADS[workload].description
            if args.full and WORKLOADS[workload].full:
                text += f" -- FULL size: {WORKLOADS[workload].full[1]}"
            described[workload] = (f"{text}. {len(prompts)} prompts, "
                                   f"{logical:,} logical prompt tokens, {unique:,} unique (prefix-trie) tokens "
                                   f"({logical / unique:.1f}x)")
        for engine in engines:
            for workload, result in run_engine(engine, workloads, args, Path(tmp)).items():
                runs[workload][engine] = result
    for per_engine in runs.values():
        if "treebatch" in per_engine:
            reference = per_engine["treebatch"]["outputs"]
            for engine, result in per_engine.items():
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
