"""The Ray checks of tests/test_ray.py, run in a network namespace holding only loopback (so both
nodes register as 127.0.0.1 and no Ray traffic can reach another address):

    unshare -n sh -c 'ip link set lo up && python tests/ray_cluster_check.py RESULTS.json WORKDIR'

A real two-node cluster (ray.cluster_utils.Cluster, one CPU each) and two replicas; writes what it
measured to RESULTS.json for the test to judge."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def batch_lines() -> list[str]:
    """Four documents with four questions each (four top-level groups), and four lone prompts."""
    words = "river stone lamp garden violin harbor lantern meadow copper thunder orchard quiet".split()
    lines = []
    for d in range(4):
        document = " ".join(words[(d * 5 + k) % len(words)] for k in range(60))
        for q in range(4):
            body = {"prompt": f"Document {d}: {document}\nQuestion {q}: which word comes first?\nAnswer:",
                    "max_tokens": 12, "temperature": 0}
            lines.append(json.dumps({"custom_id": f"d{d}q{q}", "method": "POST", "url": "/v1/completions", "body": body}))
    for i in range(4):
        body = {"prompt": f"Lone prompt {i} about {words[i]}:", "max_tokens": 12, "temperature": 0}
        lines.append(json.dumps({"custom_id": f"lone{i}", "method": "POST", "url": "/v1/completions", "body": body}))
    return lines


def run_file(cli, source: Path, target: Path, factory, *extra: str) -> tuple[int, dict]:
    summary = target.with_suffix(".summary.json")
    status = cli.main(["run", str(source), "-o", str(target), "--summary", str(summary), "--overwrite", *extra],
                      llm_factory=factory)
    return status, json.loads(summary.read_text())


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(path: Path) -> dict[str, str]:
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records(path)}


def main() -> None:
    out_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    import ray
    from ray.cluster_utils import Cluster

    from treebatch import LLM, SamplingParams, cli
    from treebatch.distributed.ray_llm import RayLLM

    results: dict = {}
    began = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    results["nodes"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    source = work / "in.jsonl"
    source.write_text("\n".join(batch_lines()) + "\n")
    options = {"dtype": "float32"}

    one = LLM(num_threads=1, **options)
    status, summary = run_file(cli, source, work / "one.jsonl", lambda **o: one)
    results["one"] = {"status": status, "computed": summary["computed_prompt_tokens"], "texts": texts(work / "one.jsonl")}
    del one

    distributed = RayLLM(num_replicas=2, **options)
    results["replica_nodes"] = sorted(ray.get([r.node_id.remote() for r in distributed.replicas]))
    status, summary = run_file(cli, source, work / "ray.jsonl", lambda **o: distributed)
    results["prefix"] = {"status": status, "computed": summary["computed_prompt_tokens"], "texts": texts(work / "ray.jsonl"),
                         "per_replica": [s["requests"] for s in distributed.last_run_summary["per_replica"]]}
    distributed.sharding = "round_robin"
    status, summary = run_file(cli, source, work / "rr.jsonl", lambda **o: distributed)
    results["round_robin"] = {"status": status, "computed": summary["computed_prompt_tokens"], "texts": texts(work / "rr.jsonl")}
    distributed.sharding = "prefix"

    # One replica killed mid-run: its unfinished requests go to the others and a replacement.
    target = work / "killed.jsonl"
    killed: list[str] = []

    def kill_when_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if target.exists() and target.read_bytes().count(b"\n") >= 1:
                ray.kill(distributed.replicas[0])
                killed.append("yes")
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_when_started, daemon=True)
    watcher.start()
    status, summary = run_file(cli, source, target, lambda **o: distributed)
    watcher.join()
    results["killed"] = {"status": status, "killed": bool(killed), "ids": [r["custom_id"] for r in records(target)],
                         "texts": texts(target), "replaced": distributed.last_run_summary["replaced_replicas"],
                         "errors": (work / "killed.errors.jsonl").exists()}
    # SIGINT on the driver mid-run: exit 130, finished results kept; the rerun resumes.
    target = work / "interrupted.jsonl"

    def interrupt_when_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if target.exists() and target.read_bytes().count(b"\n") >= 1:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=interrupt_when_started, daemon=True)
    watcher.start()
    first = cli.main(["run", str(source), "-o", str(target)], llm_factory=lambda **o: distributed)
    watcher.join()
    done_first = len(records(target))
    second = cli.main(["run", str(source), "-o", str(target)], llm_factory=lambda **o: distributed)
    results["interrupted"] = {"first": first, "done_first": done_first, "second": second,
                              "ids": [r["custom_id"] for r in records(target)], "texts": texts(target)}

    # The engine raising on a replica (a prompt past the context) reaches the caller; the
    # replicas are replaced and the next call runs.
    try:
        distributed.generate([{"prompt_token_ids": [5] * 100_000}])
        results["engine_error"] = None
    except Exception as exc:  # noqa: BLE001  (whatever Ray wraps it in)
        results["engine_error"] = str(exc)[-300:]
    again = distributed.generate(["Lone prompt 0 about river:"], SamplingParams(max_tokens=12, temperature=0.0))
    results["after_error"] = again[0].outputs[0].text
    distributed.shutdown()

    # Ray Data: rows keyed by prefix, grouped, each group answered by a treebatch worker.
    from treebatch.distributed.ray_data import Generate, PrefixKey

    rows = [{"id": (r := json.loads(line))["custom_id"], "prompt": r["body"]["prompt"]} for line in batch_lines()]
    ds = ray.data.from_items(rows).map_batches(PrefixKey, concurrency=1, batch_format="numpy")
    ds = ds.groupby("prefix_key").map_groups(
        Generate, fn_constructor_kwargs={"sampling_params": {"max_tokens": 12, "temperature": 0.0}, "dtype": "float32",
                                         "num_threads": 1},
        concurrency=1, batch_format="numpy",
    )
    answered = ds.take_all()
    results["ray_data"] = {"texts": {row["id"]: str(row["generated_text"]) for row in answered}, "rows": len(answered),
                           "keys": len({row["prefix_key"] for row in answered})}
    results["seconds"] = round(time.monotonic() - began, 1)
    out_path.write_text(json.dumps(results))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
