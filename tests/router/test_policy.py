"""Routing policies over hand-made worker states (no servers)."""

from __future__ import annotations

from collections import Counter

import pytest

from radixlm.router.args import RouterArgs
from radixlm.router.policy import (
    CacheAware,
    ConsistentHash,
    PowerOfTwo,
    RoundRobin,
    ShortestQueue,
    WorkerState,
    make_policy,
)


def workers(*in_flight: int) -> list[WorkerState]:
    """Workers with requests in flight, all decoding."""
    return [WorkerState(f"http://w{i}", in_flight=n, decoding=n) for i, n in enumerate(in_flight)]


def test_longest_match_wins_while_balanced() -> None:
    ws = workers(0, 0)
    ws[1].tree.insert(list(range(100)))
    d = CacheAware(RouterArgs()).choose(ws, list(range(120)), None)
    assert (d.worker, d.reason, d.matched) == (ws[1], "cache", 100)


def test_sglang_balance_thresholds() -> None:
    """Unbalanced means max - min > 64 and max > 1.5 * min (both), SGLang's defaults."""
    policy, prompt = CacheAware(RouterArgs()), list(range(20))
    for loads, unbalanced in (
        ((65, 0), True),
        ((64, 0), False),
        ((200, 140), False),
        ((220, 140), True),
    ):
        ws = workers(*loads)
        ws[0].tree.insert(prompt)
        d = policy.choose(ws, prompt, None)
        assert (d.reason == "balance") == unbalanced, loads
        assert d.worker is (ws[1] if unbalanced else ws[0])


def test_below_the_cache_threshold_least_work_wins() -> None:
    ws = workers(0, 0)
    ws[0].tree.insert(list(range(10)))
    ws[0].prefill_tokens = 500  # a long prompt queued there
    d = CacheAware(RouterArgs()).choose(ws, list(range(100)), None)
    assert (d.worker, d.reason) == (ws[1], "work")
    ws[1].decoding, ws[1].prefill_tokens = 300, 300  # now the uncached prompt costs less on w0
    assert CacheAware(RouterArgs()).choose(ws, list(range(100)), None).worker is ws[0]


def test_consistent_hash_moves_only_the_keys_of_a_worker_that_left() -> None:
    policy = ConsistentHash(RoundRobin())
    ws = workers(0, 0, 0)
    keys = [f"session-{i}" for i in range(300)]
    before = {k: policy.choose(ws, [], k).worker.url for k in keys}
    assert len(set(before.values())) == 3
    after = {k: policy.choose(ws[:2], [], k).worker.url for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != ws[2].url)
    assert policy.choose(ws, [], None).reason == "round_robin"  # no key: the fallback


def test_power_of_two_takes_the_lighter() -> None:
    ws = workers(0, 0)
    ws[0].prefill_tokens = 1000
    assert {PowerOfTwo(seed=s).choose(ws, [], None).worker.url for s in range(5)} == {ws[1].url}


def test_shortest_queue_takes_the_fewest_in_flight() -> None:
    ws = workers(3, 1, 2)
    ws[1].prefill_tokens = 10_000  # work does not count, only requests
    ws[0].tree.insert(list(range(50)))  # nor the cache
    policy = make_policy(RouterArgs(policy="shortest_queue"))
    assert isinstance(policy, ShortestQueue)
    for _ in range(4):
        d = policy.choose(ws, list(range(50)), None)
        assert (d.worker, d.reason, d.matched) == (ws[1], "shortest_queue", None)


def test_shortest_queue_spreads_ties_and_tracks_the_queues() -> None:
    """Requests that stay in flight fill the queues evenly; equal queues take turns."""
    ws = workers(0, 0, 0)
    policy = ShortestQueue()
    for _ in range(9):
        policy.choose(ws, [], None).worker.in_flight += 1
    assert [w.in_flight for w in ws] == [3, 3, 3]
    idle = workers(0, 0)
    assert Counter(policy.choose(idle, [], None).worker.url for _ in range(10)) == Counter(
        {"http://w0": 5, "http://w1": 5}
    )


def test_cache_aware_load_metric_queue_balances_by_requests() -> None:
    """With --load-metric queue, requests in flight decide where the cache does not (SGLang's
    rule); with the default, the estimated work does."""
    ws = workers(1, 3)
    ws[0].prefill_tokens = 900  # one long uncached prompt queued on w0
    prompt = list(range(100))
    by_work = CacheAware(RouterArgs()).choose(ws, prompt, None)
    assert (by_work.worker, by_work.reason, by_work.matched) == (ws[1], "work", 0)
    by_queue = CacheAware(RouterArgs(load_metric="queue")).choose(ws, prompt, None)
    assert (by_queue.worker, by_queue.reason) == (ws[0], "queue")
    # The cache still wins first under either metric, ties going to the lower load.
    ws[0].tree.insert(prompt)
    ws[1].tree.insert(prompt)
    assert CacheAware(RouterArgs()).choose(ws, prompt, None).worker is ws[1]
    assert CacheAware(RouterArgs(load_metric="queue")).choose(ws, prompt, None).worker is ws[0]


def test_bad_load_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="load_metric"):
        RouterArgs(load_metric="tokens")
