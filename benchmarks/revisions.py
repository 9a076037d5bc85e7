"""treebatch against itself at another revision: same batches, same harness, rounds interleaved.

    .venv/bin/python benchmarks/revisions.py --base REV [--workload all] [--rounds 2] [--full]
                                             [--out BENCHMARKS.md]

The base revision is checked out into a temporary git worktree; run.py's treebatch worker runs
once per round for each side (base, then current, then current, then base, ...), importing
treebatch from that side's tree (PYTHONPATH), on the batches run.py builds. Each worker loads its
engine with the default config (measuring its own token budget once, untimed) and runs every
workload. The table gives the seconds of every round, the ratio of the medians, and whether the
greedy tokens of both sides are equal on every request. Results: JSON under benchmarks/results/,
markdown between the revisions markers of --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_between  # noqa: E402
from run import prepare_workloads, run_engine, suite_workloads  # noqa: E402

BEGIN, END = "<!-- revisions:begin -->", "<!-- revisions:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--workload", default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # run_engine's harness options (transformers engines only; unused by treebatch's worker)
    args.hf_batch_size, args.hf_sort, args.hf_model_folder, args.hf_cb_max_batch_tokens = 16, True, HERE / ".model-hf", 512
    repo = HERE.parent
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
    current_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                                 capture_output=True, text=True).stdout.strip()
    workloads = suite_workloads(args.workload)
    seconds: dict[str, dict[str, list[float]]] = {"base": {}, "current": {}}
    outputs: dict[str, dict[str, list[list[int]]]] = {"base": {}, "current": {}}
    budgets: dict[str, set[Any]] = {"base": set(), "current": set()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tree = folder / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.base], cwd=repo, check=True)
        try:
            batches = prepare_workloads(workloads, args.full, folder)
            sources = {"base": tree, "current": repo}
            for round_index in range(args.rounds):
                order = ("base", "current") if round_index % 2 == 0 else ("current", "base")
                for side in order:
                    results = run_engine("treebatch", workloads, args, folder, label=f"treebatch-{side}",
                                         extra_env={"PYTHONPATH": str(sources[side])})
                    for name, result in results.items():
                        seconds[side].setdefault(name, []).append(result["seconds"])
                        outputs[side][name] = result["outputs"]
                        budgets[side].add(result["options"].get("token_budget"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, check=False)
    rows = []
    for name in workloads:
        base_median = statistics.median(seconds["base"][name])
        current_median = statistics.median(seconds["current"][name])
        rows.append({
            "workload": name,
            "requests": len(batches[name]["prompts"]),
            "base_seconds": seconds["base"][name],
            "current_seconds": seconds["current"][name],
            "ratio": round(current_median / base_median, 3),
            "tokens_equal": outputs["base"][name] == outputs["current"][name],
        })
    command = "python benchmarks/revisions.py " + " ".join(sys.argv[1:])
    text = table(rows, command, base_rev, current_rev)
    text += f"\n\nMeasured token budgets: base {sorted(budgets['base'])}, current {sorted(budgets['current'])}."
    print(text)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results_dir / f"{stamp}-revisions-{base_rev}-{current_rev}.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.out is not None:
        replace_between(args.out, BEGIN, END, text, heading="## Against an earlier revision")


def table(rows: list[dict[str, Any]], command: str, base: str, current: str) -> str:
    from treebatch.host import cpu_model

    out = [
        f"Command: `{command}` (base {base}, current {current}; {cpu_model()}).", "",
        "| workload | requests | base s (rounds) | current s (rounds) | current / base (medians) | greedy tokens equal |",
        "|---|---:|---|---|---:|---|",
    ]
    for r in rows:
        base_s = ", ".join(f"{s:.2f}" for s in r["base_seconds"])
        current_s = ", ".join(f"{s:.2f}" for s in r["current_seconds"])
        out.append(f"| {r['workload']} | {r['requests']} | {base_s} | {current_s} | {r['ratio']:.3f} "
                   f"| {'yes' if r['tokens_equal'] else 'NO'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
