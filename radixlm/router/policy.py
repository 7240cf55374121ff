"""Which worker gets a request: the routing policies, over the router's view of each worker."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from radixlm.router.args import RouterArgs
from radixlm.router.tree import MirrorTree

# Points per worker on the consistent-hash ring: enough that keys spread evenly.
VIRTUAL_NODES = 160


@dataclass(slots=True, eq=False)
class WorkerState:
    """What the router knows of one worker: its cache (mirrored) and the work it sent it."""

    url: str
    tree: MirrorTree = field(default_factory=MirrorTree)
    in_flight: int = 0  # requests sent whose answer has not ended
    prefill_tokens: int = 0  # uncached prompt tokens of the requests with no output yet
    decoding: int = 0  # requests that have streamed output and not ended

    @property
    def work(self) -> int:
        """Estimated work queued: prefill tokens still to compute plus running decodes."""
        return self.prefill_tokens + self.decoding


@dataclass(frozen=True, slots=True)
class Decision:
    """A routing decision and why, for logs, metrics and tests."""

    worker: WorkerState
    # cache | work | queue | balance | hash | round_robin | random | power_of_two | shortest_queue
    reason: str
    matched: int | None = None  # prompt tokens the chosen worker holds; None: not looked up


class Policy(Protocol):
    """Picks one of the healthy workers (never an empty sequence) for a request."""

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """The worker for a prompt's token ids and its routing key (session or user), if any."""


def estimated_work(worker: WorkerState, uncached: int) -> int:
    """Prefill tokens queued and running decodes, with a prompt's uncached tokens added."""
    return worker.work + uncached


def queue_length(worker: WorkerState, uncached: int) -> int:
    """Requests in flight (SGLang's load measure); the prompt does not count."""
    return worker.in_flight


# cache_aware's load measures, by --load-metric.
LOAD_METRICS: dict[str, Callable[[WorkerState, int], int]] = {
    "work": estimated_work,
    "queue": queue_length,
}


class CacheAware:
    """The longest cached prefix wins, unless load is unbalanced or too little is cached
    anywhere; then the least load, by default the estimated work counting this prompt's
    uncached tokens. Ties between equal matches go to the least load too."""

    def __init__(self, args: RouterArgs) -> None:
        self.cache_threshold = args.cache_threshold
        self.abs_threshold = args.balance_abs_threshold
        self.rel_threshold = args.balance_rel_threshold
        self.load = LOAD_METRICS[args.load_metric]
        self.metric = args.load_metric

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        matched = [w.tree.match(ids) for w in workers]
        loads = [w.in_flight for w in workers]
        lo, hi = min(loads), max(loads)
        unbalanced = hi - lo > self.abs_threshold and hi > self.rel_threshold * lo
        best = max(matched)
        n = len(ids)
        if not unbalanced and ids and best / n > self.cache_threshold:
            i = min(
                (i for i, m in enumerate(matched) if m == best),
                key=lambda i: self.load(workers[i], n - best),
            )
            return Decision(workers[i], "cache", best)
        i = min(range(len(workers)), key=lambda i: self.load(workers[i], n - matched[i]))
        return Decision(workers[i], "balance" if unbalanced else self.metric, matched[i])


class ShortestQueue:
    """The fewest requests in flight from this router (SGLang's load fallback); ties in turn."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        n = len(workers)
        start = next(self._next) % n
        worker = min((workers[(start + i) % n] for i in range(n)), key=lambda w: w.in_flight)
        return Decision(worker, "shortest_queue")


class RoundRobin:
    """Each worker in turn."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        return Decision(workers[next(self._next) % len(workers)], "round_robin")


class Random:
    """A worker at random."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        return Decision(self._rng.choice(workers), "random")


class PowerOfTwo:
    """The less loaded of two workers drawn at random (by estimated work)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        pair = self._rng.sample(list(workers), min(2, len(workers)))
        return Decision(min(pair, key=lambda w: (w.work, w.in_flight)), "power_of_two")


class ConsistentHash:
    """Requests with the same routing key go to the same worker while it lives; a worker that
    leaves moves only its own keys. Requests without a key are routed cache-aware."""

    def __init__(self, fallback: Policy) -> None:
        self.fallback = fallback
        self._ring: list[tuple[int, str]] = []
        self._urls: frozenset[str] = frozenset()

    def choose(self, workers: Sequence[WorkerState], ids: list[int], key: str | None) -> Decision:
        """See the class."""
        if key is None:
            return self.fallback.choose(workers, ids, key)
        by_url = {w.url: w for w in workers}
        if frozenset(by_url) != self._urls:
            self._urls = frozenset(by_url)
            self._ring = sorted(
                (_hash(f"{url}#{v}"), url) for url in by_url for v in range(VIRTUAL_NODES)
            )
        i = bisect.bisect(self._ring, (_hash(key), "")) % len(self._ring)
        return Decision(by_url[self._ring[i][1]], "hash")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def make_policy(args: RouterArgs) -> Policy:
    """The policy args name."""
    if args.policy == "round_robin":
        return RoundRobin()
    if args.policy == "random":
        return Random()
    if args.policy == "power_of_two":
        return PowerOfTwo()
    if args.policy == "shortest_queue":
        return ShortestQueue()
    if args.policy == "consistent_hash":
        return ConsistentHash(CacheAware(args))
    return CacheAware(args)
