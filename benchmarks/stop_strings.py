"""What stop strings cost: the same batch generated with a stop string that never matches and without.

    .venv/bin/python benchmarks/stop_strings.py [--num-requests 64] [--max-tokens 2048]

64 requests (`--num-requests`) each generate exactly `--max-tokens` tokens (greedy, ignore_eos) on
the default model (`LLM()`), once without stop strings and once with `stop=["\\u241e never"]`,
which never matches, so both runs compute the same tokens and differ only in the stop-string
search (the output processor's incremental detokenizing). A short untimed run first builds the
kernels and fills the caches. The two variants alternate for `--rounds` rounds (without, with,
then with, without, ...), so drift of the machine hits both alike. Prints the seconds of each
run, the overhead ratio of the medians (with - without) / without, and the seconds spent inside
the output processor in each (timed around `OutputProcessor.add_token` and `.finish`); the runs'
token ids must agree. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

NEVER = "\u241e never"


def prompts(count: int) -> list[str]:
    topics = ["the sea", "a clock", "mountains", "a library", "rain", "an old map", "bees", "a train"]
    return [f"Story {i}: a long tale about {topics[i % len(topics)]}. Once upon a time," for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from treebatch import LLM, SamplingParams
    from method_timer import time_methods  # beside this script

    from treebatch.output_processor import OutputProcessor

    inside = time_methods(OutputProcessor, ("add_token", "finish"))  # seconds in the output processor

    llm = LLM()
    batch = prompts(args.num_requests)

    def params(stop: list[str] | None) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, stop=stop)

    llm.generate(batch[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    processor_seconds: dict[str, list[float]] = {"without": [], "with": []}
    tokens: dict[str, list[list[int]]] = {}
    stops = {"without": None, "with": [NEVER]}
    for round_index in range(args.rounds):
        for name in ("without", "with") if round_index % 2 == 0 else ("with", "without"):
            inside[0] = 0.0
            started = time.perf_counter()
            outputs = llm.generate(batch, params(stops[name]), use_tqdm=False)
            seconds[name].append(time.perf_counter() - started)
            processor_seconds[name].append(inside[0])
            tokens[name] = [o.outputs[0].token_ids for o in outputs]
    if tokens["with"] != tokens["without"]:
        raise SystemExit("the runs with and without the stop string generated different tokens")
    total = sum(len(t) for t in tokens["with"])
    with_s, without_s = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    print(f"{args.num_requests} requests x {args.max_tokens} tokens ({total} generated per run), {args.rounds} rounds")
    for name in ("without", "with"):
        runs = ", ".join(f"{t:.2f}" for t in seconds[name])
        inner = ", ".join(f"{t:.2f}" for t in processor_seconds[name])
        print(f"{name:8s} stop string: {runs} s (output processor {inner} s)")
    print(f"overhead ratio of the medians  {(with_s - without_s) / without_s:+.4f}")

if __name__ == "__main__":
    main()
