"""RayLLM: the `LLM.generate_iter` interface over replicas on a Ray cluster, sharded by prefix.

The driver holds the tokenizer only. Each call plans the batch's prefix tree as one process would
(core/plan.py), puts whole top-level groups on replicas by predicted load (core/shard.py), and
sends each replica its shard. A replica is a Ray actor holding one `LLM` (the model loaded once
per actor, its threads its `num_cpus`); it streams each result back the moment it finishes, and
the driver yields it: so a batch-file run (treebatch/batch/job.py) writes, orders, resumes and
summarizes exactly as in one process, the driver alone touching the files.

A replica that dies (killed, out of memory, its node gone) loses only its unfinished requests:
the driver starts a replica in its place and plans those requests again over the live replicas.
Each input index is yielded once, whatever a dead replica had sent before it died. An exception
the engine raises on a replica is raised to the caller (a batch-file run then retries that
window's unanswered requests one at a time, as in one process); the replicas still working are
stopped and replaced.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from treebatch.config import EngineConfig
from treebatch.core.plan import plan_batch
from treebatch.core.shard import round_robin, shard_plan
from treebatch.outputs import RequestOutput
from treebatch.sampling_params import SamplingParams

RAY_MISSING = "--ray needs Ray: pip install 'treebatch[ray]' (or pip install ray)"
# Run-summary fields that add up over replicas; the others are per replica.
_ADDITIVE = ("requests", "prompt_tokens", "computed_prompt_tokens", "unique_prompt_tokens", "groups",
             "generated_tokens", "forced_tokens", "preemptions", "steps")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(RAY_MISSING) from exc
    return ray


class Replica:
    """One LLM on one Ray worker (made a Ray actor class by RayLLM)."""

    def __init__(self, engine_options: dict[str, Any]) -> None:
        from treebatch.llm import LLM

        self.llm = LLM(**engine_options)

    def ready(self) -> str:
        return self.llm.model_name

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def generate(self, indices: list[int], prompts: list[Any], params: list[SamplingParams]) -> Iterator[Any]:
        """Yield (input index, output) as each finishes, then ("summary", the run summary)."""
        for position, output in self.llm.generate_iter(prompts, params, use_tqdm=False):
            yield indices[position], output
        yield "summary", self.llm.last_run_summary


class RayLLM:
    """`LLM`'s batch interface (`generate_iter`, `generate`, `tokenizer`, `model_name`,
    `max_model_len`, `last_run_summary`) over `num_replicas` Ray actors.

    `address`: a running cluster ("auto", "HOST:PORT"), or None to start a local one. `sharding`:
    "prefix" (whole top-level groups per replica, balanced by predicted load) or "round_robin"
    (prefix-blind, for comparison)."""

    def __init__(
        self, address: str | None = None, num_replicas: int = 2, replica_cpus: float = 1, replica_gpus: float = 0,
        sharding: str = "prefix", **engine_options: Any,
    ) -> None:
        from treebatch.tokenizer import load_tokenizer_only

        assert num_replicas >= 1 and sharding in ("prefix", "round_robin")
        self.ray = ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.config = EngineConfig.from_kwargs(**engine_options)
        loaded = load_tokenizer_only(self.config.model, self.config.tokenizer, self.config.max_model_len)
        self.tokenizer, self.max_model_len, self.model_name = loaded.tokenizer, loaded.max_model_len, loaded.model_name
        # A replica's threads are its CPUs, so replicas on one machine do not oversubscribe it.
        self._options = {**engine_options, "num_threads": engine_options.get("num_threads") or max(1, int(replica_cpus))}
        self._actor_class = ray.remote(num_cpus=replica_cpus, num_gpus=replica_gpus, max_restarts=0)(Replica)
        self.sharding = sharding
        self.replicas = [self._start_replica() for _ in range(num_replicas)]
        ray.get([replica.ready.remote() for replica in self.replicas])  # every model loaded
        self.num_replaced_replicas = 0
        self.last_run_summary: dict[str, Any] | None = None

    def _start_replica(self) -> Any:
        return self._actor_class.remote(self._options)

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for index, output in self.generate_iter(prompts, sampling_params, use_tqdm):
            outputs[index] = output
        return outputs  # type: ignore[return-value]

    def generate_iter(
        self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (input index, output) as each prompt's samples finish on whichever replica."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
        assert len(params) == len(prompts), "one SamplingParams per prompt"
        results: queue.Queue = queue.Queue()
        done: set[int] = set()
        summaries: list[dict[str, Any]] = []
        running: dict[int, list[int]] = {}  # stream id -> the indices it carries
        streams = iter(range(1 << 62))

        def launch(indices: list[int]) -> None:
            for replica, shard in zip(list(self.replicas), self._shard(indices, prompts, params)):
                if shard:
                    stream = next(streams)
                    running[stream] = shard
                    threading.Thread(target=self._pump, args=(stream, replica, shard, prompts, params, results),
                                     daemon=True).start()

        launch(list(range(len(prompts))))
        try:
            while running:
                stream, kind, payload = results.get()
                if kind == "output":
                    index, output = payload
                    if index not in done:
                        done.add(index)
                        yield index, output
                elif kind == "summary":
                    summaries.append(payload)
                    del running[stream]
                elif kind == "error":
                    raise payload
                else:  # the replica died: the rest of its shard goes to the live ones
                    lost = [i for i in running.pop(stream) if i not in done]
                    self._replace(payload)
                    if lost:
                        launch(lost)
        finally:
            if running:  # left early (a signal, a closed iterator): stop the work still going
                for replica in self.replicas:
                    self.ray.kill(replica)
                self.replicas = [self._start_replica() for _ in self.replicas]
        self.last_run_summary = _merge(summaries, len(self.replicas), self.num_replaced_replicas)

    def _shard(self, indices: list[int], prompts: list[Any], params: list[SamplingParams]) -> list[list[int]]:
        """`indices` split over the replicas, as lists of input indices."""
        if self.sharding == "round_robin":
            return [[indices[i] for i in shard] for shard in round_robin(len(indices), len(self.replicas))]
        token_ids = [self._token_ids(prompts[i]) for i in indices]
        outputs = [(params[i].max_tokens or self.max_model_len) * params[i].n for i in indices]
        plan = plan_batch(token_ids, outputs, self.config.scheduler, self.config.cache.block_size)
        shards = shard_plan(plan, [len(t) for t in token_ids], outputs, len(self.replicas))
        return [[indices[i] for i in shard] for shard in shards]

    def _token_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        return self.tokenizer(text)["input_ids"]

    def _pump(self, stream: int, replica: Any, shard: list[int], prompts: list[Any], params: list[SamplingParams],
              results: queue.Queue) -> None:
        """Run one shard on one replica (a driver thread per shard), forwarding what it yields."""
        try:
            generator = replica.generate.options(num_returns="streaming").remote(
                shard, [prompts[i] for i in shard], [params[i] for i in shard]
            )
            for ref in generator:
                index, output = self.ray.get(ref)
                if index == "summary":
                    results.put((stream, "summary", output))
                    return
                results.put((stream, "output", (index, output)))
            results.put((stream, "summary", {}))
        except self.ray.exceptions.RayActorError:
            results.put((stream, "dead", replica))
        except Exception as exc:  # the engine raised on the replica: the caller's to handle
            results.put((stream, "error", exc))

    def _replace(self, dead: Any) -> None:
        """A replica in the place of a dead one (the live ones keep working meanwhile)."""
        self.num_replaced_replicas += 1
        self.replicas = [self._start_replica() if r is dead else r for r in self.replicas]

    def shutdown(self) -> None:
        for replica in self.replicas:
            self.ray.kill(replica)
        self.replicas = []


def _merge(summaries: list[dict[str, Any]], num_replicas: int, num_replaced: int) -> dict[str, Any]:
    merged: dict[str, Any] = {key: sum(s.get(key, 0) for s in summaries) for key in _ADDITIVE}
    merged["elapsed_s"] = max((s.get("elapsed_s", 0.0) for s in summaries), default=0.0)
    merged["peak_kv_usage"] = max((s.get("peak_kv_usage", 0.0) for s in summaries), default=0.0)
    merged["replicas"] = num_replicas
    merged["replaced_replicas"] = num_replaced
    merged["per_replica"] = list(summaries)
    return merged
