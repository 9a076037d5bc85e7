"""Order policies: in which order the batch's groups run, and the output lengths they weigh.

The plan (core/batch_plan.py) walks the tree of prefix groups depth-first, so a group's prefix,
its members and its child groups stay together and its KV is freed as soon as its subtree is
done. What a policy chooses is the order of *siblings*: the root groups and plain requests of the
batch, and inside each group its members and child groups. Each sibling is an `OrderNode`: a
subtree summed up as the prompt tokens it computes and the output tokens it is expected to make.

- fcfs: input order (a subtree runs at the position of its earliest request).
- dfs: tree order: members, then child groups, in token order; plain requests last.
- ratio: BatchLLM's rule: larger decode/prefill ratio first, so the long decodes of early groups
  overlap the prefill chunks of later ones instead of trailing alone at the end.
- blend: BlendServe's rule: siblings sorted by compute density (prefill per decode token), then
  taken from both ends so the running mix stays near the batch's own mix: prefill-heavy
  (compute-bound) and decode-heavy (memory-bound) work share the steps.

Output lengths (`Request.estimated_output_tokens`) are exact under ignore_eos. Otherwise they
start at max_tokens; for the policies that weigh them, `WarmupSample` runs a small sample of
real requests of the batch first and scales the estimates of the rest by the sample's measured
lengths, per subtree where the subtree was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

from treebatch.core.grouping import group_prompts
from treebatch.core.prefix_tree import PrefixTree
from treebatch.core.request import Request

POLICIES = ("fcfs", "dfs", "ratio", "blend")
WARMUP_FRACTION = 0.015  # of the batch, spread evenly over the tree
# Below this many requests no warm-up. The sample runs alone, in small steps, for up to
# max_tokens steps before the rest starts: from 1000 requests on (a sample of 15 or more) that
# costs about 1% of the run. Smaller batches keep max_tokens as the estimate, which loses little:
# a scale shared by the whole batch changes neither ratio's nor blend's order.
WARMUP_MIN_REQUESTS = 1000


@dataclass(slots=True)
class OrderNode:
    first_arrival: int  # smallest input index under the node
    prefill_tokens: int  # prompt tokens the subtree computes (shared prefixes once)
    decode_tokens: float  # output tokens the subtree is expected to generate

    @property
    def decode_per_prefill(self) -> float:
        return self.decode_tokens / max(self.prefill_tokens, 1)


def order_siblings(nodes: list[OrderNode], policy: str) -> list[int]:
    """Positions into `nodes` (given in dfs order) in the order they should run."""
    if policy == "dfs":
        return list(range(len(nodes)))
    if policy == "fcfs":
        return sorted(range(len(nodes)), key=lambda i: nodes[i].first_arrival)
    if policy == "ratio":
        return sorted(range(len(nodes)), key=lambda i: -nodes[i].decode_per_prefill)
    if policy == "blend":
        return _blend(nodes)
    raise ValueError(f"unknown order policy {policy!r}; one of {POLICIES}")


def _blend(nodes: list[OrderNode]) -> list[int]:
    """Two pointers over the nodes sorted from compute-heavy to memory-heavy: take from the
    compute-heavy end while the work taken so far has less prefill per decode token than the
    whole batch, else from the memory-heavy end."""
    by_density = sorted(range(len(nodes)), key=lambda i: -nodes[i].prefill_tokens / max(nodes[i].decode_tokens, 1.0))
    total_prefill = sum(n.prefill_tokens for n in nodes)
    total_decode = sum(n.decode_tokens for n in nodes)
    order: list[int] = []
    lo, hi = 0, len(by_density) - 1
    prefill = decode = 0.0
    while lo <= hi:
        if prefill * total_decode <= decode * total_prefill:  # prefill/decode at or below the mix
            index, lo = by_density[lo], lo + 1
        else:
            index, hi = by_density[hi], hi - 1
        order.append(index)
        prefill += nodes[index].prefill_tokens
        decode += nodes[index].decode_tokens
    return order


def uses_output_estimates(policy: str) -> bool:
    return policy in ("ratio", "blend")


class WarmupSample:
    """A few real requests of the batch, run first, whose measured output lengths correct the
    max_tokens-based estimates of the rest.

    The sample is systematic over the depth-first order of the batch's prefix groups (every
    k-th request), so each subtree holds about `fraction` of its requests in it. After the sample
    finished, a request's scale is the mean (output tokens / max_tokens) of the sampled requests
    in the deepest group above it that has any, else of the whole sample.
    """

    def __init__(self, requests: list[Request], min_prefix_tokens: int, fraction: float | None = None) -> None:
        fraction = WARMUP_FRACTION if fraction is None else fraction
        tree = PrefixTree.build([r.prompt_token_ids for r in requests])
        plan = group_prompts(tree, min_prefix_tokens=min_prefix_tokens)
        order = plan.dfs_order()
        count = max(1, round(fraction * len(requests)))
        chosen = {order[int((j + 0.5) * len(order) / count)] for j in range(count)}
        self.chains = [plan.groups_of(i) for i in range(len(requests))]  # root-to-deepest group ids
        self.sample = [requests[i] for i in sorted(chosen)]
        self.rest = [requests[i] for i in range(len(requests)) if i not in chosen]
        self._sample_index = sorted(chosen)
        self._rest_index = [i for i in range(len(requests)) if i not in chosen]

    @staticmethod
    def is_worth_it(policy: str, requests: list[Request]) -> bool:
        return (
            uses_output_estimates(policy)
            and len(requests) >= WARMUP_MIN_REQUESTS
            and any(not r.sampling_params.ignore_eos for r in requests)
        )

    def apply(self) -> None:
        """Scale the rest's estimates by the finished sample's measured lengths."""
        by_group: dict[int, list[float]] = {}
        every: list[float] = []
        for index, request in zip(self._sample_index, self.sample):
            ratio = request.num_output_tokens / request.max_tokens
            every.append(ratio)
            for group in self.chains[index]:
                by_group.setdefault(group, []).append(ratio)
        if not every:
            return
        overall = sum(every) / len(every)
        for index, request in zip(self._rest_index, self.rest):
            if request.sampling_params.ignore_eos:
                continue  # already exact
            scale = overall
            for group in reversed(self.chains[index]):
                if group in by_group:
                    scale = sum(by_group[group]) / len(by_group[group])
                    break
            request.estimated_output_tokens = max(1, min(request.max_tokens, round(scale * request.max_tokens)))
