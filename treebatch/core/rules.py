"""The scheduling rules, as pure functions on counts.

The scheduler applies them to live requests, the step layout to a step's chunks, and the cost
model gets them for free by replaying a plan through the same scheduler and layout: one
definition of each rule, so a prediction cannot drift from what runs.
"""

from __future__ import annotations

# Fraction of the running requests' expected KV growth that admission keeps free. All of it
# (1.0) never preempts when estimates are exact but leaves blocks idle while requests are young
# and holds back requests that stop early; none (0.0) admits until decodes run out of blocks and
# recompute. Half keeps preemptions rare without starving admission.
GROWTH_RESERVE = 0.5


def chunk_size(num_remaining: int, budget: int, enable_chunked_prefill: bool) -> int:
    """Tokens of a request's remaining work that go into this step: all of it when it fits the
    budget left, else the budget (chunked prefill) or nothing (whole prompts only)."""
    if num_remaining <= budget:
        return num_remaining
    return budget if enable_chunked_prefill else 0


def expected_growth(estimated_peak_blocks: int, num_held_blocks: int) -> int:
    """KV blocks a request is expected to add before it finishes: the most it is expected to
    hold at once (its whole length, or a window's worth when blocks leave the window) less what
    it holds."""
    return max(0, estimated_peak_blocks - num_held_blocks)


def growth_reserve(total_expected_growth: int) -> int:
    """Blocks admission keeps free for the running requests' growth."""
    return int(GROWTH_RESERVE * total_expected_growth)


def prefix_fits(estimated_blocks: int, num_pool_blocks: int, num_available_blocks: int, has_running: bool) -> bool:
    """Whole groups are admitted together: a group's prefix starts only when the group's
    estimated KV (prefix plus direct members) fits in the available blocks (the free ones less
    the growth reserve), or half the pool if the group is larger. Always yes when nothing runs:
    the prefix's own blocks are all it needs to start."""
    return not has_running or num_available_blocks >= min(estimated_blocks, num_pool_blocks // 2)


def fits_with_growth(
    num_free_blocks: int, num_first_chunk_blocks: int, running_growth: int, own_growth: int, has_running: bool
) -> bool:
    """After its first chunk, do the free blocks still cover GROWTH_RESERVE of what the running
    requests and the new one are expected to grow by? Always yes when nothing runs, so a request
    that fits the cache at all is never refused forever."""
    if not has_running:
        return True
    return num_free_blocks - num_first_chunk_blocks >= GROWTH_RESERVE * (running_growth + own_growth)


def reads_prefix_once(num_queries: int, min_queries: int | None) -> bool:
    """Shared-prefix attention for a group in a step: enough of its queries (members' and those
    handed up from groups below) to gain from reading the prefix once. None: never."""
    return min_queries is not None and num_queries >= min_queries


def decodes_join_prefix(num_decodes: int, min_decodes: int) -> bool:
    """A group's single-query rows join its shared-prefix product only from `min_decodes` of them
    in a step; fewer read their whole context in place, which is cheaper."""
    return num_decodes >= min_decodes
