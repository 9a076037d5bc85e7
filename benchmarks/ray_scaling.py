"""Ray scale-out on one machine: 2 replicas x 1 thread against 1 process x 2 threads (the same
cores), and prefix-aware against round-robin sharding.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/ray_scaling.py [--out BENCHMARKS.md]'

(Ray in a loopback-only network namespace: it then registers as 127.0.0.1 and talks to no other
address.) Workloads from benchmarks/workloads.py at their published sizes: docqa (4 documents x
16 questions under one system prompt) and gsp at 8 groups x 8 prompts; greedy, ignore_eos, each
request exactly the workload's output tokens, float32, the default model. Each variant is timed
around one `generate` of the whole batch, after an untimed warm-up; engine start-up (model loads,
replicas starting) is not timed. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import ray
    from workloads import SEED, WORKLOADS, build_grouped, load_tokenizer

    from treebatch import LLM, SamplingParams
    from treebatch.distributed.ray_llm import RayLLM

    tokenizer = load_tokenizer()
    batches = {
        "docqa": (WORKLOADS["docqa"].prompts(tokenizer, full=True), WORKLOADS["docqa"].max_tokens),
        "gsp": (build_grouped(tokenizer, np.random.default_rng(SEED), 8, 8, 450, 60), WORKLOADS["gsp"].max_tokens),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    one = LLM(dtype="float32", num_threads=2)
    replicas = RayLLM(num_replicas=2, replica_cpus=1, dtype="float32")
    rows = []
    for name, (prompts, max_tokens) in batches.items():
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        one.generate(inputs[:2], params, use_tqdm=False)
        replicas.generate(inputs[:4], params)
        reference = None
        for variant in ("1 process x 2 threads", "2 replicas x 1 thread, prefix-aware", "2 replicas x 1 thread, round-robin"):
            llm = one if variant.startswith("1 process") else replicas
            replicas.sharding = "round_robin" if "round-robin" in variant else "prefix"
            began = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            seconds = time.perf_counter() - began
            tokens = [o.outputs[0].token_ids for o in outputs]
            reference = reference or tokens
            summary = llm.last_run_summary
            rows.append((name, len(prompts), variant, seconds, len(prompts) * max_tokens / seconds,
                         summary["computed_prompt_tokens"], tokens == reference))
            print(rows[-1][:6], flush=True)
    base = {name: seconds for name, _, variant, seconds, *_ in rows if variant.startswith("1 process")}
    table = ["| workload | requests | variant | seconds | generated tok/s | throughput vs 1 process | computed prompt tokens | tokens equal 1 process |",
             "|---|---|---|---|---|---|---|---|"]
    for name, count, variant, seconds, rate, computed, equal in rows:
        table.append(f"| {name} | {count} | {variant} | {seconds:.2f} | {rate:.1f} | {base[name] / seconds:.3f} | {computed} | {equal} |")
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown CPU")
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n## Ray: 2 replicas x 1 thread against 1 process x 2 threads\n\nCommand: `unshare -n sh -c "
                    f"'ip link set lo up && python benchmarks/ray_scaling.py'` ({cpu}, 2 cores, "
                    f"{time.strftime('%Y-%m-%d')}; greedy, float32, the default model).\n\n{text}\n")
    replicas.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
