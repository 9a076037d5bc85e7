"""Whole-batch benchmark: treebatch against peer engines on fixed token-id workloads.

    .venv/bin/python benchmarks/run.py [--workload all|mixed|smoke|docqa,...] [--engines all|treebatch,hf_generate,...]
                                       [--dtypes float32,bfloat16] [--out BENCHMARKS.md]

With `--dtypes float32,bfloat16` every engine runs in each dtype (rows "engine [dtype]", each
compared with treebatch in the same dtype). Before the first engine and after the last, a short
process measures the machine's matmul peak in each dtype (roofline.py; the better of the two
counts).
Every engine then runs in its own subprocess (`--worker`), one at a time, so thread pools and
memory never mix and an engine may come from another venv. Each worker writes a JSON result;
the parent checks token counts, compares greedy outputs with treebatch, charges every row the
FLOPs the batch truly needs (roofline fraction), prints a markdown table, saves the JSON under
benchmarks/results/, draws a PNG of the table and writes both into the record (--out).
An engine whose worker fails becomes an "n/a (reason)" row; the run then exits with status 1.
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

from report import (engine_label, json_path_for, machine_facts, markdown_table, plot_path_for,  # noqa: E402
                    treebatch_label, write_plot, write_record)
from roofline import best_peak, measure_peak_in_subprocess, needed_flops, roofline  # noqa: E402
from shapes import SHAPES, build_shape  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

# `--engines all`, in table order.
ALL_ENGINES = ("treebatch", "vllm", "vllm_noprefix", "hf_generate", "hf_generate_batch")


def worker(args: argparse.Namespace) -> None:
    """Child process: load one engine once (untimed), run every workload, write JSON results."""
    from engines import ENGINES

    began = time.perf_counter()
    options: dict[str, Any] = {"dtype": args.dtype, "model_shape": args.model_shape,
                               "hf_batch_size": args.hf_batch_size, "hf_sort": args.hf_sort,
                               "hf_model_folder": str(args.hf_model_folder),
                               "hf_cb_max_batch_tokens": args.hf_cb_max_batch_tokens}
    if args.treebatch_options:
        options["treebatch_kwargs"] = json.loads(args.treebatch_options)
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


class EngineFailed(Exception):
    """An engine's worker exited with an error (or never produced results): the reason, in one line."""


def run_engine(engine: str, workloads: list[str], args: argparse.Namespace, folder: Path,
               treebatch_options: dict[str, Any] | None = None, label: str | None = None,
               extra_env: dict[str, str] | None = None, dtype: str = "float32") -> dict[str, dict[str, Any]]:
    """One worker process for `engine` over all workloads; results per workload.

    `treebatch_options` are engine options for treebatch's `LLM(...)` (the ablation's variants);
    `label` names the log file and the progress lines (default: the engine); `extra_env` is added
    to the worker's environment (revisions.py points PYTHONPATH at another checkout)."""
    label = label or engine
    result_file = folder / f"result-{label.replace(' ', '_')}.json"
    result_file.unlink(missing_ok=True)
    python, env = engine_command(engine)
    env.update(extra_env or {})
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--dtype", dtype, "--workload", ",".join(workloads),
           "--result-file", str(result_file), "--prompts-dir", str(folder),
           "--hf-batch-size", str(args.hf_batch_size), "--hf-model-folder", str(args.hf_model_folder),
           "--hf-cb-max-batch-tokens", str(getattr(args, "hf_cb_max_batch_tokens", 512))]
    if getattr(args, "model_shape", None):
        cmd += ["--model-shape", args.model_shape]
    cmd.append("--hf-sort" if args.hf_sort else "--no-hf-sort")
    if treebatch_options:
        cmd += ["--treebatch-options", json.dumps(treebatch_options)]
    print(f"{label}: {', '.join(workloads)} ...", file=sys.stderr, flush=True)
    logs = HERE / "results" / "logs"  # gitignored; the last run's worker output per engine
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{label.replace(' ', '_')}.txt"
    with open(log, "w") as out:  # engines' own chatter (vLLM logs a lot) goes to a file
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not result_file.exists():
        text = log.read_text()
        sys.stderr.write(text[-6000:])
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise EngineFailed(f"worker exit {done.returncode}: {lines[-1][:200] if lines else 'no output'}")
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
    parser.add_argument("--engines", default="treebatch,hf_generate",
                        help=f"comma list of {', '.join(ALL_ENGINES)}, or 'all'")
    parser.add_argument("--out", default=None, help="markdown record to update, e.g. BENCHMARKS.md")
    parser.add_argument("--dtypes", default="float32",
                        help="comma list of float32, bfloat16: every engine runs in each (rows 'engine [dtype]')")
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--hf-cb-max-batch-tokens", type=int, default=512,
                        help="hf_generate_batch: tokens per step (0: transformers' default, 8192)")
    parser.add_argument("--hf-sort", action=argparse.BooleanOptionalAction, default=True,
                        help="batch HF prompts sorted by length (default; less padding for the peer)")
    parser.add_argument("--hf-model-folder", type=Path, default=HERE / ".model-hf",
                        help="where the default model is exported as a HF folder for vLLM (gitignored)")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default=None,
                        help="run a larger model shape (random weights, benchmarks/shapes.py) instead of the default model")
    parser.add_argument("--full", action="store_true",
                        help="published workload sizes instead of the 2-core scaled ones (slow)")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false",
                        help="skip the matmul peak measurement (no roofline fraction column)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--treebatch-options", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    # 'all': the suite (docqa, gsp, batchllm_micro, nosharing); `mixed` and `smoke` run by name.
    workloads = suite_workloads(args.workload)
    engines = list(ALL_ENGINES) if args.engines == "all" else args.engines.split(",")
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        raise SystemExit(f"unknown dtype(s) in {args.dtypes!r}; known: float32, bfloat16")
    unknown = [e for e in engines if e not in ALL_ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; known: {', '.join(ALL_ENGINES)}")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    from engines import ENGINE_PYTHON, export_hf_model

    if args.model_shape:
        args.hf_model_folder = build_shape(args.model_shape)  # every engine reads this folder
    elif any(e in ENGINE_PYTHON for e in engines):
        export_hf_model(args.hf_model_folder)
    runs: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in workloads}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches = prepare_workloads(workloads, args.full, Path(tmp), args.model_shape)
        # The peak is measured before the first engine and after the last, and the better of the two
        # kept: a best-of measurement, so one disturbed moment on a shared machine does not set it.
        peaks = {d: [measure_peak_in_subprocess(dtype=d)] for d in dtypes} if args.roofline else {}
        for dtype in dtypes:
            for engine in engines:
                label = engine_label(engine, dtype, dtypes)
                try:
                    for workload, result in run_engine(engine, workloads, args, Path(tmp), label=label,
                                                       dtype=dtype).items():
                        runs[workload][label] = result
                except EngineFailed as error:
                    failed[label] = str(error)
                    print(f"{label}: n/a ({error})", file=sys.stderr, flush=True)
                    for workload in workloads:
                        runs[workload][label] = {"engine": engine, "workload": workload, "unavailable": str(error)}
        for d in peaks:
            peaks[d].append(measure_peak_in_subprocess(dtype=d))
    peak_by_dtype = {d: best_peak(p) for d, p in peaks.items()}
    peak = peak_by_dtype.get("float32") if dtypes == ["float32"] else peak_by_dtype or None
    for per_engine in runs.values():
        for label, result in per_engine.items():
            reference = per_engine.get(treebatch_label(label), {}).get("outputs")
            if reference is not None and label != treebatch_label(label) and "outputs" in result:
                result["agreement_with_treebatch"] = agreement(reference, result["outputs"])
    add_roofline_and_prediction(runs, batches, peak_by_dtype)
    for per_engine in runs.values():
        for result in per_engine.values():
            result.pop("outputs", None)  # kept out of the saved JSON: big and not needed later

    command = " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]])
    record = {"command": command, "started": started, "machine": machine_facts(), "peak": peak,
              "model_shape": args.model_shape, "workloads": {w: b["description"] for w, b in batches.items()},
              "needed_flops": {w: b["needed"] for w, b in batches.items()}, "runs": runs, "failed": failed}
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else None
    saved = json_path_for(out, results_dir, f"{stamp}-{'_'.join(workloads)}")
    saved.parent.mkdir(parents=True, exist_ok=True)  # a scratch --out may name a new folder
    saved.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {saved}", file=sys.stderr)

    table = markdown_table(runs)
    print(table)
    plot = plot_path_for(out, results_dir, stamp, args.model_shape)
    if write_plot(runs, plot, title=f"{', '.join(workloads)} ({started})"):
        print(f"plot: {plot}", file=sys.stderr)
    else:
        plot = None
    if out:
        write_record(out, record, table, plot)
    if failed:
        raise SystemExit(f"engine(s) failed, shown as n/a: {', '.join(failed)}")


def suite_workloads(spec: str) -> list[str]:
    """'all' is the shared-prefix suite (every workload but `mixed` and `smoke`); else a comma list."""
    names = [w for w in WORKLOADS if w not in ("smoke", "mixed")] if spec == "all" else spec.split(",")
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    return names


def prepare_workloads(workloads: list[str], full: bool, folder: Path,
                      model_shape: str | None = None) -> dict[str, dict[str, Any]]:
    """Build every batch once (token ids, written to `folder` for the workers), describe it and
    count the FLOPs it truly needs (roofline.needed_flops) with the model's config (the default
    model's, or the shape's; the token ids come from the default model's tokenizer either way)."""
    from transformers import AutoTokenizer

    from treebatch.models.loader import config_from_hf, load_model

    from workloads import trie_size

    model = load_model(None)  # the default model's tokenizer (and config, for the FLOPs)
    config = config_from_hf(SHAPES[model_shape]) if model_shape else model.config
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    batches: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        spec = WORKLOADS[workload]
        prompts = spec.prompts(tokenizer, full=full)
        (folder / f"{workload}.json").write_text(json.dumps(prompts))
        logical, unique = sum(len(p) for p in prompts), trie_size(prompts)
        text = spec.description
        if full and spec.full:
            text += f" -- FULL size: {spec.full[1]}"
        needed = needed_flops(prompts, spec.max_tokens, config)
        description = (f"{text}. {len(prompts)} prompts, {logical:,} logical prompt tokens, "
                       f"{unique:,} unique (prefix-trie) tokens ({logical / unique:.1f}x); "
                       f"needs {needed['total_gflop']:,.1f} GFLOP (body {needed['body_gflop']:,.1f}, "
                       f"head {needed['head_gflop']:,.1f}, attention {needed['attention_gflop']:,.1f})")
        batches[workload] = {"prompts": prompts, "max_tokens": spec.max_tokens, "description": description,
                             "needed": needed}
    return batches


def add_roofline_and_prediction(runs: dict[str, dict[str, dict[str, Any]]], batches: dict[str, dict[str, Any]],
                                peaks: dict[str, dict[str, Any] | None]) -> None:
    """Per row: achieved GFLOP/s of the needed work and its fraction of the peak in the row's
    dtype; for treebatch rows, the cost model's predicted seconds where the worker got one
    (engines.predict_treebatch_seconds, computed before the timer from the engine's calibration)."""
    for workload, per_engine in runs.items():
        batch = batches[workload]
        for result in per_engine.values():
            if "seconds" not in result:
                continue
            dtype = result.get("options", {}).get("dtype", "float32")
            result["roofline"] = roofline(result["seconds"], batch["needed"], peaks.get(dtype))
            predicted = result.get("options", {}).get("predicted_seconds")
            if predicted is not None:
                result["predicted_seconds"] = predicted


if __name__ == "__main__":
    main()
