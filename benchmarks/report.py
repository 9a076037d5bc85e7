"""The record: machine facts, the markdown table, and the generated part of BENCHMARKS.md.

run.py owns only the text between the two markers below; notes written by hand outside
them survive every rerun.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

BEGIN = "<!-- benchmarks/run.py: generated results begin -->"
END = "<!-- benchmarks/run.py: generated results end -->"


def machine_facts() -> dict[str, Any]:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}


def markdown_table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """workload x engine; the ratio is treebatch's speed over that engine's (>1: treebatch faster)."""
    rows = ["| workload | engine | seconds | generated tok/s | total tok/s | treebatch speed / engine speed "
            "| greedy tokens equal treebatch | load avg (before, after) | engine start s (once per engine, untimed) |",
            "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for workload, per_engine in runs.items():
        base = per_engine.get("treebatch")
        for engine, r in per_engine.items():
            ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
            agree = r.get("agreement_with_treebatch")
            same = (f"{agree['identical']}/{agree['of']} seqs (mean common prefix {agree['mean_common_prefix']})"
                    if agree else "-")
            rows.append(f"| {workload} | {engine} | {r['seconds']:.1f} | {r['generated_tokens_per_s']:.1f} "
                        f"| {r['total_tokens_per_s']:.1f} | {ratio} | {same} "
                        f"| {r['loadavg_1m_before']}, {r['loadavg_1m_after']} | {r.get('engine_start_seconds', '-')} |")
    return "\n".join(rows)


def write_record(path: Path, record: dict[str, Any], table: str) -> None:
    m = record["machine"]
    workloads = "\n".join(f"- `{name}`: {text}" for name, text in record["workloads"].items())
    generated = "\n".join([
        BEGIN,
        f"Latest run: {record['started']}",
        "",
        f"```\n{record['command']}\n```",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; 1-minute load average at the end {m['loadavg_at_end']}.",
        "",
        workloads,
        "",
        table,
        END,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + generated + tail)
