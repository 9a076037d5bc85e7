"""Order policies: in which order the batch's groups run, and the output lengths they weigh.

The plan (core/plan.py) walks the tree of prefix groups depth-first, so a group's prefix,
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
start at max_tokens; for the policies that weigh them, a small warm-up sample of real requests
of the batch runs first and the estimates of the rest are scaled by the sample's measured
lengths, per subtree where the subtree was sampled (`plan.warmup_sample`, `plan.rescaled_estimates`).
"""

from __future__ import annotations

from dataclasses import dataclass

from treebatch.config import ORDER_POLICIES

POLICIES = ORDER_POLICIES


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
