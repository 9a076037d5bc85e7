"""Compare order policies on a few batches, in one process, one model, runs interleaved.

    .venv/bin/python benchmarks/policy_probe.py [--rounds 3] [--budget 256] [--workloads ...]

Every run generates the same tokens (greedy, EOS ignored, so every policy does the same work);
only the order of the batch changes. Policies are run round-robin, each round starting one policy
later (fcfs dfs ratio blend, then dfs ratio blend fcfs, ...) so that a change in machine load
does not favour whichever policy runs last; the table
shows each policy's median seconds and its time relative to dfs. On a shared machine the numbers
are noisy: read ratios, not absolute times, and look at the spread across rounds.

Workloads: the shared-prefix shapes of benchmarks/workloads.py (docqa, gsp, batchllm_micro, at
their scaled sizes), and two made here where output lengths differ, which is what ordering can
exploit: `grouped_lengths` (6 documents x 6 questions, each document's questions asking 4 to 64
tokens) and `plain_lengths` (24 unrelated prompts asking 4 to 64 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402

from treebatch import LLM, SamplingParams  # noqa: E402
from treebatch.core.cost_model import predict_batch_time  # noqa: E402
from treebatch.core.policies import POLICIES  # noqa: E402

LENGTHS = (4, 48, 8, 64, 16, 32)


def grouped_lengths(tokenizer) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(workloads.SEED)
    seen: set[tuple[int, ...]] = set()
    prompts, max_tokens = [], []
    for g, length in enumerate(LENGTHS):
        prefix = workloads.document(tokenizer, rng, 200, g + 1)
        for _ in range(6):
            prompts.append(prefix + workloads.question(tokenizer, rng, 30, seen))
            max_tokens.append(length)
    order = rng.permutation(len(prompts))  # arrival order unlike tree order
    return [prompts[i] for i in order], [max_tokens[i] for i in order]


def plain_lengths(tokenizer) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(workloads.SEED + 1)
    prompts = workloads.build_nosharing(tokenizer, rng, count=24, low=40, high=240)
    return prompts, [LENGTHS[i % len(LENGTHS)] for i in range(len(prompts))]


def from_workload(name: str):
    def build(tokenizer) -> tuple[list[list[int]], list[int]]:
        workload = workloads.WORKLOADS[name]
        prompts = workload.prompts(tokenizer)
        return prompts, [workload.max_tokens] * len(prompts)

    return build


BUILDERS = {
    "grouped_lengths": grouped_lengths,
    "plain_lengths": plain_lengths,
    "docqa": from_workload("docqa"),
    "gsp": from_workload("gsp"),
    "batchllm_micro": from_workload("batchllm_micro"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None, help="token budget (default: calibrated)")
    parser.add_argument("--workloads", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--predict", action="store_true", help="also print the cost model's prediction")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = parser.parse_args()

    llm = LLM(max_num_batched_tokens=args.budget, num_threads=args.threads)
    tokenizer = workloads.load_tokenizer()
    print(f"token budget {llm.engine.token_budget}, {args.rounds} rounds, policies interleaved", flush=True)
    for name in args.workloads:
        prompts, max_tokens = BUILDERS[name](tokenizer)
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        batch = [{"prompt_token_ids": p} for p in prompts]
        times: dict[str, list[float]] = {p: [] for p in args.policies}
        reference = None
        for round_index in range(args.rounds):
            # Each round starts one policy later, so a drift in machine load does not always
            # favour the same policy.
            shift = round_index % len(args.policies)
            for policy in args.policies[shift:] + args.policies[:shift]:
                llm.engine.order_policy = policy
                start = time.perf_counter()
                outputs = llm.generate(batch, params, use_tqdm=False)
                times[policy].append(time.perf_counter() - start)
                print(f"    {name} {policy}: {times[policy][-1]:.2f} s, {llm.last_run_summary['steps']} steps", flush=True)
                tokens = [o.outputs[0].token_ids for o in outputs]
                reference = reference or tokens
                assert tokens == reference, f"{policy} changed the greedy tokens"
        base = statistics.median(times["dfs"]) if "dfs" in times else None
        print(f"\n{name}: {len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, {sum(max_tokens)} output tokens")
        for policy, seconds in times.items():
            median = statistics.median(seconds)
            relative = f"{median / base:.3f}" if base else "-"
            spread = ", ".join(f"{s:.2f}" for s in seconds)
            predicted = ""
            if args.predict:
                guess = predict_batch_time(
                    prompts, max_tokens, llm.engine.calibration, token_budget=llm.engine.token_budget,
                    block_size=llm.config.cache.block_size, order_policy=policy,
                    min_shared_prefix_tokens=llm.config.scheduler.min_shared_prefix_tokens,
                )
                predicted = f"   predicted {guess['predicted_seconds']:.2f} s (no sharing {guess['predicted_seconds_no_sharing']:.2f})"
            print(f"  {policy:6s} median {median:7.2f} s  vs dfs {relative}   runs: {spread}{predicted}", flush=True)


if __name__ == "__main__":
    main()
