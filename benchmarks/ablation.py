"""Ablation: treebatch alone on the benchmark workloads, one engine option changed at a time.

    .venv/bin/python benchmarks/ablation.py [--workload all|smoke|docqa,...] [--variants default,no_sharing,...]
                                            [--out BENCHMARKS.md]

Variants: the default config; each order policy (`order_policy` fcfs, dfs, ratio, blend);
prefix sharing off (`enable_prefix_sharing=False`); shared-prefix attention off
(`enable_shared_prefix_attention=False`); the per-step token budget fixed at 512 or measured on
this machine (`max_num_batched_tokens=None`). A variant whose options this treebatch does not
accept (`EngineConfig.from_kwargs` raises) is listed as "not available", not run.

Every variant runs in its own worker process (run.py's, with the options passed to `LLM(...)`),
one after another, never two at once. The batches, timing, token-count checks and roofline
are run.py's; the table compares each variant with the default config on the same workload.
Results: JSON under benchmarks/results/, markdown between the ablation markers of --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import (ABLATION_BEGIN, ABLATION_END, ablation_table, json_path_for, machine_facts, peak_line,  # noqa: E402
                    replace_between)
from roofline import best_peak, measure_peak_in_subprocess, roofline  # noqa: E402
from run import EngineFailed, agreement, prepare_workloads, run_engine, suite_workloads  # noqa: E402

# name -> engine options for LLM(...); "default" is the baseline of the ratio column.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "order_fcfs": {"order_policy": "fcfs"},
    "order_dfs": {"order_policy": "dfs"},
    "order_ratio": {"order_policy": "ratio"},
    "order_blend": {"order_policy": "blend"},
    "no_prefix_sharing": {"enable_prefix_sharing": False},
    "no_shared_prefix_attention": {"enable_shared_prefix_attention": False},
    "budget_fixed_512": {"max_num_batched_tokens": 512},
    "budget_measured": {"max_num_batched_tokens": None},
}


def unavailable_reason(options: dict[str, Any]) -> str | None:
    """Why this treebatch cannot take `options` (None if it can): the config is built exactly as
    `LLM(**options)` builds it, without loading anything."""
    from treebatch.config import EngineConfig

    try:
        EngineConfig.from_kwargs(**options)
    except (TypeError, ValueError, AssertionError) as error:
        return f"{type(error).__name__}: {error}".strip().rstrip(":")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", help="as run.py: 'all' (the suite), or a comma list")
    parser.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, or 'all'")
    parser.add_argument("--out", default=None, help="markdown record to update, e.g. BENCHMARKS.md")
    parser.add_argument("--full", action="store_true", help="published workload sizes (slow)")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false",
                        help="skip the matmul peak measurement")
    args = parser.parse_args()
    workloads = suite_workloads(args.workload)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "default" not in names:
        names.insert(0, "default")  # the baseline of every ratio
    # run_engine's worker options (the HF ones are unused by treebatch's worker).
    worker_args = argparse.Namespace(hf_batch_size=16, hf_sort=True, hf_model_folder=HERE / ".model-hf")

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches = prepare_workloads(workloads, args.full, Path(tmp))
        peaks = [measure_peak_in_subprocess()] if args.roofline else []  # before and after, as run.py
        for name in names:
            options = VARIANTS[name]
            reason = unavailable_reason(options)
            results: dict[str, dict[str, Any]] = {}
            if reason is None:
                try:
                    results = run_engine("treebatch", workloads, worker_args, Path(tmp),
                                         treebatch_options=options or None, label=f"ablation-{name}")
                except EngineFailed as error:
                    results, reason = {}, f"failed ({error})"
            else:
                reason = f"not available ({reason})"
                print(f"{name}: {reason}", file=sys.stderr, flush=True)
            for workload in workloads:
                row: dict[str, Any] = {"variant": name, "options": options, "workload": workload,
                                       "unique_prompt_tokens": batches[workload]["needed"]["unique_prompt_tokens"]}
                result = results.get(workload)
                if result is None:
                    row["status"] = reason or "no result"
                else:
                    outputs[(name, workload)] = result.pop("outputs")
                    row.update({k: result[k] for k in ("seconds", "requests", "prompt_tokens", "generated_tokens",
                                                       "generated_tokens_per_s", "total_tokens_per_s",
                                                       "loadavg_1m_before", "loadavg_1m_after",
                                                       "engine_start_seconds")})
                    row["treebatch_summary"] = result.get("options", {}).get("treebatch_summary")
                    if result.get("options", {}).get("predicted_seconds") is not None:
                        row["predicted_seconds"] = result["options"]["predicted_seconds"]
                        row["cost_model"] = result["options"].get("cost_model")
                rows.append(row)
        if args.roofline:
            peaks.append(measure_peak_in_subprocess())
    peak = best_peak(peaks)
    for row in rows:
        if "seconds" in row:
            row["roofline"] = roofline(row["seconds"], batches[row["workload"]]["needed"], peak)
    for row in rows:
        mine, base = outputs.get((row["variant"], row["workload"])), outputs.get(("default", row["workload"]))
        if mine is not None and base is not None and row["variant"] != "default":
            row["agreement_with_default"] = agreement(base, mine)

    command = " ".join([".venv/bin/python", "benchmarks/ablation.py", *sys.argv[1:]])
    record = {"command": command, "started": started, "machine": machine_facts(), "peak": peak,
              "workloads": {w: b["description"] for w, b in batches.items()},
              "needed_flops": {w: b["needed"] for w, b in batches.items()}, "rows": rows}
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved = json_path_for(Path(args.out) if args.out else None, results_dir, f"{stamp}-ablation-{'_'.join(workloads)}")
    saved.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {saved}", file=sys.stderr)

    table = ablation_table(rows)
    differing = [f"{r['variant']} on {r['workload']}: {r['agreement_with_default']['identical']}/"
                 f"{r['agreement_with_default']['of']}" for r in rows
                 if "agreement_with_default" in r
                 and r["agreement_with_default"]["identical"] != r["agreement_with_default"]["of"]]
    same = ("Greedy tokens: every variant's sequences equal the default config's on every workload."
            if not differing else "Greedy sequences equal to the default config's: " + "; ".join(differing) + ".")
    print(table)
    print(same)
    if args.out:
        m = record["machine"]
        body = "\n".join([
            f"Latest ablation run: {started}",
            "",
            f"```\n{command}\n```",
            "",
            f"Machine: {m['nproc']} cores ({m['cpu']}), torch {m['torch']}; 1-minute load average at the end "
            f"{m['loadavg_at_end']}.",
            peak_line(peak),
            "",
            table,
            "",
            same,
        ])
        replace_between(Path(args.out), ABLATION_BEGIN, ABLATION_END, body, heading="## Ablation")


if __name__ == "__main__":
    main()
