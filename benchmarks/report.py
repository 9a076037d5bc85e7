"""The record: machine facts, the markdown tables, the plot, and the generated parts of BENCHMARKS.md.

run.py owns only the text between its two markers below, ablation.py only the text between
its own; notes written by hand outside them survive every rerun.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

BEGIN = "<!-- benchmarks/run.py: generated results begin -->"
END = "<!-- benchmarks/run.py: generated results end -->"
ABLATION_BEGIN = "<!-- benchmarks/ablation.py: generated ablation begin -->"
ABLATION_END = "<!-- benchmarks/ablation.py: generated ablation end -->"


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


def _roofline_cells(r: dict[str, Any]) -> str:
    roof = r.get("roofline") or {}
    fraction = roof.get("roofline_fraction")
    return f"{roof.get('achieved_gflops', 0):.1f} | {f'{fraction:.2f}' if fraction is not None else '-'}"


def engine_label(engine: str, dtype: str, dtypes: list[str]) -> str:
    """How a row names an engine: bare when one dtype runs, else "engine [dtype]"."""
    return engine if len(dtypes) == 1 else f"{engine} [{dtype}]"


def treebatch_label(label: str) -> str:
    """The treebatch row an engine's row is compared with: the one in the same dtype."""
    return "treebatch" + (label[label.index(" ["):] if " [" in label else "")


def markdown_table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """workload x engine; the ratio is treebatch's speed over that engine's (>1: treebatch faster),
    treebatch in the same dtype as the row.

    "needed GFLOP/s" charges every engine the same FLOPs (what the batch truly needs, see
    roofline.py); "of peak" divides it by the measured matmul peak. A "predicted s" column
    appears when the cost model gave a prediction for treebatch rows."""
    predicted = any("predicted_seconds" in r for per in runs.values() for r in per.values())
    head = ("| workload | engine | seconds | generated tok/s | total tok/s | treebatch speed / engine speed "
            "| needed GFLOP/s | of peak |" + (" predicted s |" if predicted else "")
            + " greedy tokens equal treebatch | load avg (before, after) | engine start s (once per engine, untimed) |")
    align = "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if predicted else "") + "---|---|---:|"
    rows = [head, align]
    for workload, per_engine in runs.items():
        for engine, r in per_engine.items():
            base = per_engine.get(treebatch_label(engine))
            if base is not None and "seconds" not in base:
                base = None
            if "seconds" not in r:
                reason = str(r.get("unavailable", "not run")).replace("|", "/")
                rows.append(f"| {workload} | {engine} | n/a ({reason}) |" + " |" * (head.count("|") - 4))
                continue
            ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
            agree = r.get("agreement_with_treebatch")
            same = (f"{agree['identical']}/{agree['of']} seqs (mean common prefix {agree['mean_common_prefix']})"
                    if agree else "-")
            pred = ""
            if predicted:
                pred = f" {r['predicted_seconds']:.1f} |" if "predicted_seconds" in r else " - |"
            rows.append(f"| {workload} | {engine} | {r['seconds']:.1f} | {r['generated_tokens_per_s']:.1f} "
                        f"| {r['total_tokens_per_s']:.1f} | {ratio} | {_roofline_cells(r)} |{pred} {same} "
                        f"| {r['loadavg_1m_before']}, {r['loadavg_1m_after']} | {r.get('engine_start_seconds', '-')} |")
    return "\n".join(rows)


def peak_line(peak: dict[str, Any] | None) -> str:
    if not peak:
        return "Matmul peak: not measured (--no-roofline, or the measurement failed)."
    if "peak_gflops" not in peak:  # one peak per dtype
        return "\n\n".join(peak_line(p) for p in peak.values())
    sizes = ", ".join(f"{n}: {g}" for n, g in peak["gflops_by_size"].items())
    return (f"Measured {peak.get('dtype', 'float32')} matmul peak: **{peak['peak_gflops']} GFLOP/s** (`torch.mm`, square n x n, "
            f"{peak['threads']} threads, best run; GFLOP/s by n: {sizes}; load average {peak['loadavg_1m']} "
            f"when measured; best of {len(peak.get('measurements', [peak]))} measurements: before the first "
            f"engine and after the last).")


def replace_between(path: Path, begin: str, end: str, body: str, heading: str = "") -> None:
    """Put `body` between the `begin` and `end` markers of `path` (appended, after `heading`,
    where the markers are not there yet); everything outside the markers is kept."""
    block = "\n".join([begin, body, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip("\n") + "\n\n" + (heading + "\n\n" if heading else "") + begin + "\n" + end + "\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + block + tail)


def write_record(path: Path, record: dict[str, Any], table: str, plot: Path | None = None) -> None:
    m = record["machine"]
    workloads = "\n".join(f"- `{name}`: {text}" for name, text in record["workloads"].items())
    parts = [
        f"Latest run: {record['started']}",
        "",
        f"```\n{record['command']}\n```",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; 1-minute load average at the end {m['loadavg_at_end']}.",
        peak_line(record.get("peak")),
        "",
        workloads,
        "",
        table,
    ]
    if plot is not None:
        link = os.path.relpath(plot.resolve(), path.resolve().parent)
        parts += ["", f"![generated tokens/s per engine and workload]({link})"]
    shape = record.get("model_shape")
    if shape:  # a larger model shape keeps its own section beside the default model's results
        parts.insert(0, f"Model: `{shape}` (benchmarks/shapes.py: its config.json values, random bf16 weights).\n")
        replace_between(path, BEGIN.replace("results", f"results ({shape})"), END.replace("results", f"results ({shape})"),
                        "\n".join(parts), heading=f"## Results: {shape}")
        return
    replace_between(path, BEGIN, END, "\n".join(parts), heading="## Results")


def is_record(out: Path | None, results_dir: Path) -> bool:
    """True for the project's record, BENCHMARKS.md at the repository root."""
    return out is not None and out.resolve() == (results_dir.parent.parent / "BENCHMARKS.md").resolve()


def json_path_for(out: Path | None, results_dir: Path, name: str) -> Path:
    """Where a run's JSON goes: benchmarks/results/NAME.json, unless --out is a scratch file (not
    BENCHMARKS.md): then beside it (same stem), so harness checks do not fill results/."""
    if out is None or is_record(out, results_dir):
        return results_dir / f"{name}.json"
    return out.with_name(f"{out.stem}-{name.split('-', 2)[-1]}.json")


def plot_path_for(out: Path | None, results_dir: Path, stamp: str, model_shape: str | None = None) -> Path:
    """Where the PNG goes: benchmarks/results/latest.png for the record BENCHMARKS.md (a larger
    model shape's run: latest-SHAPE.png, beside the suite's own), beside any other --out file
    (same name, .png), else under results/ with the run's time stamp."""
    if out is None:
        return results_dir / f"{stamp}.png"
    if is_record(out, results_dir):
        return results_dir / (f"latest-{model_shape}.png" if model_shape else "latest.png")
    return out.with_suffix(".png")


def write_plot(runs: dict[str, dict[str, dict[str, Any]]], path: Path, title: str = "") -> bool:
    """Two panels, one group of bars per workload and one bar per engine: generated tokens/s, and
    the fraction of the measured matmul peak reached on the needed FLOPs. False (no file) if
    matplotlib is missing (`pip install -e ".[bench]"`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return False
    workloads = list(runs)
    engines: list[str] = []
    for per_engine in runs.values():
        engines += [e for e in per_engine if e not in engines]
    has_peak = any("roofline_fraction" in (r.get("roofline") or {}) for per in runs.values() for r in per.values())
    panels = 2 if has_peak else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 1.6 * len(workloads) + 3), 3.4 * panels), squeeze=False)
    width = 0.8 / max(len(engines), 1)
    colors = {engine: f"C{k}" for k, engine in enumerate(engines)}  # one colour per engine, both panels
    metrics = [("tps", "generated tokens/s"), ("roof", "fraction of matmul peak\n(needed FLOPs)")][:panels]
    for panel, (key, label) in enumerate(metrics):
        ax = axes[panel][0]
        for k, engine in enumerate(engines):
            xs, ys = [], []
            for i, workload in enumerate(workloads):
                r = runs[workload].get(engine)
                if not r or "seconds" not in r:
                    continue
                value = (r["generated_tokens_per_s"] if key == "tps"
                         else (r.get("roofline") or {}).get("roofline_fraction"))
                if value is None:
                    continue
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(value)
            if not xs:  # failed everywhere: named in the legend, no bars
                ax.bar([0], [0], 0, color=colors[engine], label=f"{engine} (n/a)")
                continue
            bars = ax.bar(xs, ys, width, color=colors[engine], label=engine)
            ax.bar_label(bars, fmt="%.2f" if key == "roof" else "%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.22)  # headroom for the value labels and the legend
        if panel == 0:
            ax.legend(fontsize=8, ncols=min(len(engines), 5), loc="upper left")
            if title:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """variant x workload for treebatch alone; ratio = variant seconds / default seconds on the
    same workload (> 1: the variant is slower than the default config)."""
    out = ["| variant | engine options | workload | seconds | predicted s | generated tok/s | variant s / default s "
           "| computed prompt tokens (trie's unique) | steps | needed GFLOP/s | of peak | load avg (before, after) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    default = {r["workload"]: r for r in rows if r["variant"] == "default" and "seconds" in r}
    for r in rows:
        options = ", ".join(f"`{k}={v!r}`" for k, v in r["options"].items()) or "(defaults)"
        if "seconds" not in r:
            out.append(f"| {r['variant']} | {options} | {r['workload']} | {r['status']} |" + " |" * 8)
            continue
        base = default.get(r["workload"])
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        summary = r.get("treebatch_summary") or {}
        computed = (f"{summary['computed_prompt_tokens']:,} ({r.get('unique_prompt_tokens', 0):,})"
                    if "computed_prompt_tokens" in summary else "-")
        predicted = f"{r['predicted_seconds']:.1f}" if r.get("predicted_seconds") is not None else "-"
        out.append(f"| {r['variant']} | {options} | {r['workload']} | {r['seconds']:.1f} | {predicted} "
                   f"| {r['generated_tokens_per_s']:.1f} | {ratio} | {computed} | {summary.get('steps', '-')} "
                   f"| {_roofline_cells(r)} | {r['loadavg_1m_before']}, {r['loadavg_1m_after']} |")
    return "\n".join(out)
