"""Resident memory of a loaded engine, per model and dtype, each in a fresh process.

    .venv/bin/python benchmarks/memory.py [--shapes default,llama-1b] [--out BENCHMARKS.md]

For each model (the embedded default; `llama-1b`, the random-weight shape of benchmarks/shapes.py)
and each of float32 and bfloat16, a child process builds `LLM(dtype=...)` (fixed token budget, so
no calibration runs) and reports: the weights as the kernels hold them (runtime/memory.py), the
peak resident set while loading (VmHWM) and the resident set after loading (VmRSS), from
/proc/self/status, each also as anonymous memory alone (RssAnon, sampled every 5 ms while
loading): the rest are pages of memory-mapped weight files, which the page cache can take back. The KV cache is allocated lazily (pages are touched as blocks fill), so it
adds nothing here. The peak shows what converting costs beyond the weights as held: the loader
hands over float32 tensors (memory-mapped where the source is), which the model converts and
packs one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_between  # noqa: E402

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(model: str, dtype: str) -> None:
    import threading
    import time

    from treebatch import LLM

    # The kernel keeps no peak of anonymous memory (VmHWM also counts the pages of memory-mapped
    # weight files, which the page cache can take back): sample RssAnon while loading.
    peak_anon = [0]
    loading = threading.Event()
    loading.set()

    def sample() -> None:
        while loading.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    llm = LLM(model=None if model == "default" else model, dtype=dtype, max_num_batched_tokens=256,
              max_model_len=2048)
    loading.clear()
    sampler.join()
    engine = llm.engine
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {key: int(status[key].split()[0]) for key in ("VmHWM", "VmRSS")}
    print(json.dumps({"weights_as_held_mib": engine.memory_need.weights / 2**20,
                      "copies": engine.memory_need.copies, "peak_mib": kib["VmHWM"] / 1024, "resident_mib": kib["VmRSS"] / 1024,
                      "peak_anon_mib": peak_anon[0] / 1024, "anon_mib": _status_kib("RssAnon") / 1024,
                      "parameters": engine.model_config.num_parameters}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="default,llama-1b")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from shapes import build_shape

    rows = ["| model | dtype | parameters | weights as held MiB (copies) | peak while loading MiB: all (anonymous) "
            "| resident after load MiB: all (anonymous) |",
            "|---|---|---:|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        model = "" if shape == "default" else str(build_shape(shape))
        for dtype in ("float32", "bfloat16"):
            done = subprocess.run([sys.executable, __file__, "--child", model or "default", dtype],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                rows.append(f"| {shape} | {dtype} | n/a ({done.stderr.strip().splitlines()[-1][:120]}) | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(f"| {shape} | {dtype} | {r['parameters'] / 1e6:,.0f}M | {r['weights_as_held_mib']:,.0f} ({r['copies']}) "
                        f"| {r['peak_mib']:,.0f} ({r['peak_anon_mib']:,.0f}) | {r['resident_mib']:,.0f} ({r['anon_mib']:,.0f}) |")
            print(rows[-1], flush=True)
    text = "Command: `python benchmarks/memory.py " + " ".join(sys.argv[1:]) + "`\n\n" + "\n".join(rows)
    print(text)
    if args.out:
        replace_between(args.out, BEGIN, END, text, heading="## Resident memory per model and dtype")


if __name__ == "__main__":
    main()
