"""What stop strings cost: the same batch generated with a stop string that never matches and without.

    .venv/bin/python benchmarks/stop_strings.py [--num-requests 64] [--max-tokens 2048]

64 requests (`--num-requests`) each generate exactly `--max-tokens` tokens (greedy, ignore_eos) on
the default model (`LLM()`), once without stop strings and once with `stop=["\\u241e never"]`,
which never matches, so both runs compute the same tokens and differ only in the stop-string
search (the output processor's incremental detokenizing). A short untimed run first builds the
kernels and fills the caches. Prints the seconds of each run and the overhead ratio
(with - without) / without; the two runs' token ids must agree. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

NEVER = "\u241e never"


def prompts(count: int) -> list[str]:
    topics = ["the sea", "a clock", "mountains", "a library", "rain", "an old map", "bees", "a train"]
    return [f"Story {i}: a long tale about {topics[i % len(topics)]}. Once upon a time," for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()

    from treebatch import LLM, SamplingParams

    llm = LLM()
    batch = prompts(args.num_requests)

    def params(stop: list[str] | None) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, stop=stop)

    llm.generate(batch[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    seconds: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for name, stop in (("without", None), ("with", [NEVER])):
        started = time.perf_counter()
        outputs = llm.generate(batch, params(stop), use_tqdm=False)
        seconds[name] = time.perf_counter() - started
        tokens[name] = [o.outputs[0].token_ids for o in outputs]
    if tokens["with"] != tokens["without"]:
        raise SystemExit("the runs with and without the stop string generated different tokens")
    total = sum(len(t) for t in tokens["with"])
    print(f"{args.num_requests} requests x {args.max_tokens} tokens ({total} generated per run)")
    print(f"without stop strings  {seconds['without']:.3f} s")
    print(f"with a stop string    {seconds['with']:.3f} s")
    print(f"overhead ratio        {(seconds['with'] - seconds['without']) / seconds['without']:+.4f}")


if __name__ == "__main__":
    main()
