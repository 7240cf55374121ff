"""Which waiting requests go first: fcfs, lpm (longest prefix match) or dfs-weight."""

from __future__ import annotations

import time
from collections import defaultdict

from radixlm.cache import MatchResult, RadixCache, TreeNode
from radixlm.core.request import Req

POLICIES = ("lpm", "fcfs", "dfs-weight")

# Above this queue length, matching every waiting request each step costs more than it saves.
_MAX_QUEUE_FOR_PREFIX_POLICY = 128


class SchedulePolicy:
    """Orders the waiting queue; requests older than `max_wait_s` go first in arrival order."""

    def __init__(self, name: str, cache: RadixCache, max_wait_s: float = 10.0) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(POLICIES)}")
        self.name = name
        self.cache = cache
        self.max_wait_s = max_wait_s

    def order(self, waiting: list[Req]) -> tuple[list[Req], dict[int, MatchResult]]:
        """Return the queue in admission order and the prefix matches computed on the way."""
        if self.name == "fcfs" or self.cache.disable or len(waiting) > _MAX_QUEUE_FOR_PREFIX_POLICY:
            return sorted(waiting, key=lambda r: r.arrival), {}
        now = time.monotonic()
        starved = sorted(
            (r for r in waiting if now - r.arrival > self.max_wait_s), key=lambda r: r.arrival
        )
        rest = [r for r in waiting if now - r.arrival <= self.max_wait_s]
        matches = {
            id(r): self.cache.match_prefix(r.fill_ids, salt=r.salt, public_len=r.public_len)
            for r in rest
        }
        if self.name == "lpm":
            # A prefix on disk is loaded, not computed: it counts as cached.
            rest.sort(key=lambda r: (-_cached_len(matches[id(r)]), r.arrival))
        else:
            rest = _dfs_weight_order(rest, matches)
        return starved + rest, matches


def _cached_len(match: MatchResult) -> int:
    return len(match.slots) + match.on_disk


def _dfs_weight_order(reqs: list[Req], matches: dict[int, MatchResult]) -> list[Req]:
    """Visit the tree depth-first, heavier subtrees (more waiting requests) first."""
    by_node: dict[int, list[Req]] = defaultdict(list)
    weight: dict[int, int] = defaultdict(int)
    nodes: dict[int, TreeNode] = {}
    root: TreeNode | None = None
    for r in reqs:
        node: TreeNode | None = matches[id(r)].node
        by_node[id(node)].append(r)
        while node is not None:
            weight[id(node)] += 1
            nodes[id(node)] = node
            root = node
            node = node.parent
    out: list[Req] = []
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        assert node is not None
        out.extend(sorted(by_node.get(id(node), []), key=lambda r: r.arrival))
        kids = [c for c in node.children.values() if id(c) in weight]
        kids.sort(key=lambda c: weight[id(c)])  # the heaviest is pushed last, so popped first
        stack.extend(kids)
    return out
