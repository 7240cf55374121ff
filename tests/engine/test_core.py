"""The engine core stepped by hand on a tiny model: policies, limits, chunking, retraction.

Every step is followed by the slot-ownership check (free + tree + private == pool, no slot owned
twice). Generated tokens are compared with the same requests run under generous limits: limits
and policies decide when work happens, never what it computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from radixlm.core.messages import GenerateRequest, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.core.plan import ScheduledSeq
from radixlm.engine.core import EngineCore

Make = Callable[..., EngineCore]


@pytest.fixture
def make(make_core: Make) -> Make:
    """Build a fresh engine core over the tiny model."""
    return make_core


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def request(rid: str, input_ids: list[int], **params: Any) -> GenerateRequest:
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 4, **params})
    return GenerateRequest(rid=rid, input_ids=list(input_ids), params=p)


@dataclass
class Result:
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    cached_tokens: int = 0


def step(s: EngineCore) -> list[TokenOutput]:
    with torch.inference_mode():
        outs = s.step()
    s.check_invariant()
    return outs


def collect(results: dict[str, Result], outs: list[TokenOutput]) -> None:
    for o in outs:
        r = results.setdefault(o.rid, Result())
        assert r.finish_reason is None, f"{o.rid} produced output after it finished"
        r.output_ids += o.new_ids
        r.cached_tokens = o.cached_tokens
        if o.finish_reason is not None:
            r.finish_reason = o.finish_reason.to_dict()


def run(s: EngineCore, max_steps: int = 400) -> dict[str, Result]:
    """Step until idle; fails if the scheduler still has work after max_steps."""
    results: dict[str, Result] = {}
    for _ in range(max_steps):
        if not s.has_work:
            return results
        collect(results, step(s))
    pytest.fail(
        f"busy after {max_steps} steps: {len(s.scheduler.waiting)} waiting, {len(s.scheduler.running)} running"
    )


def tokens(results: dict[str, Result]) -> dict[str, list[int]]:
    return {rid: r.output_ids for rid, r in results.items()}


def warm(s: EngineCore, *prompts: list[int]) -> None:
    """Put prompts in the cache (max_new_tokens=0 caches exactly the prompt)."""
    for i, p in enumerate(prompts):
        s.add(request(f"warm{i}", p, max_new_tokens=0))
    run(s)


def running(s: EngineCore) -> list[str]:
    return [r.rid for r in s.scheduler.running]


# ---- policies ------------------------------------------------------------------------------


def test_lpm_admits_the_longest_cached_prefix_first(make: Make) -> None:
    s = make(max_running_requests=1)
    shared = ids(40, seed=1)
    warm(s, shared)
    s.add(request("cold", ids(40, seed=2)))  # first to arrive, nothing cached
    s.add(request("some", shared[:20] + ids(20, seed=3)))
    s.add(request("most", shared + ids(5, seed=4)))
    ordered, _ = s.scheduler.admission.policy.order(s.scheduler.waiting)
    assert [r.rid for r in ordered] == ["most", "some", "cold"]
    step(s)
    assert running(s) == ["most"]
    results = run(s)
    assert {rid: r.cached_tokens for rid, r in results.items()} == {
        "most": 40,
        "some": 20,
        "cold": 0,
    }


def test_fcfs_admits_in_arrival_order(make: Make) -> None:
    s = make(max_running_requests=1, schedule_policy="fcfs")
    shared = ids(40, seed=1)
    warm(s, shared)
    s.add(request("cold", ids(40, seed=2)))
    s.add(request("most", shared + ids(5, seed=4)))
    step(s)
    assert running(s) == ["cold"]
    assert run(s)["most"].cached_tokens == 40  # still served from the cache when its turn comes


def test_lpm_age_bound_puts_an_old_request_first(make: Make) -> None:
    s = make(max_running_requests=1)
    shared = ids(40, seed=1)
    warm(s, shared)
    s.add(request("cold", ids(40, seed=2)))
    s.add(request("hot", shared + ids(5, seed=4)))
    s.scheduler.waiting[0].arrival -= (
        s.scheduler.config.max_wait_s + 1
    )  # "cold" has waited past the bound
    step(s)
    assert running(s) == ["cold"]
    run(s)


def test_lpm_does_not_starve_a_request_without_a_cached_prefix(make: Make) -> None:
    """A steady stream of cache hits would always win under lpm; the age bound lets the cold
    request in once it has waited max_wait_s."""
    max_wait = 0.5
    s = make(max_running_requests=1, max_wait_s=max_wait)
    shared = ids(40, seed=1)
    warm(s, shared)
    s.add(request("cold", ids(40, seed=2), max_new_tokens=1))
    arrival = s.scheduler.waiting[0].arrival
    results: dict[str, Result] = {}
    hot = 0
    deadline = time.monotonic() + max_wait + 30
    while "cold" not in results and time.monotonic() < deadline:
        while sum(r.rid.startswith("hot") for r in s.scheduler.waiting) < 2:
            s.add(request(f"hot{hot}", shared + [hot + 3], max_new_tokens=1))
            hot += 1
        collect(results, step(s))
    assert "cold" in results, "the cold request starved"
    served_hot = sum(rid.startswith("hot") for rid in results)
    assert served_hot >= 1  # lpm preferred the cache hits while the cold request was young
    assert time.monotonic() - arrival >= max_wait
    run(s)


def test_dfs_weight_visits_the_heaviest_subtree_first(make: Make) -> None:
    s = make(schedule_policy="dfs-weight", max_running_requests=1)
    p1, p2, q = ids(30, seed=1), ids(30, seed=2), ids(10, seed=3)
    warm(s, p1, p2, p2 + q)
    # Arrival order: the lone p1 request first, then the p2 subtree's three, one of them deeper.
    s.add(request("x1", p1 + ids(4, seed=10)))
    s.add(request("root", ids(20, seed=11)))
    s.add(request("y1", p2 + ids(4, seed=12)))
    s.add(request("z1", p2 + q + ids(4, seed=13)))
    s.add(request("y2", p2 + ids(4, seed=14)))
    order = [r.rid for r in s.scheduler.admission.policy.order(s.scheduler.waiting)[0]]
    assert sorted(order) == ["root", "x1", "y1", "y2", "z1"]
    # Depth-first: a subtree's requests are contiguous and the heavier subtree (p2: three
    # requests) comes before the lighter one (p1: one); requests at one node in arrival order.
    # Requests with no match sit at the root, before or after every subtree.
    assert order.index("root") in (0, len(order) - 1)
    tree_order = [r for r in order if r != "root"]
    assert set(tree_order[:3]) == {"y1", "y2", "z1"} and tree_order[3] == "x1"
    assert tree_order.index("y1") < tree_order.index("y2")
    step(s)
    assert running(s)[0] in ({"y1", "y2", "z1"} | ({"root"} if order[0] == "root" else set()))
    run(s)


# ---- limits --------------------------------------------------------------------------------


def test_max_running_requests_is_respected(make: Make) -> None:
    prompts = [ids(10 + i, seed=i) for i in range(6)]

    def submit(s: EngineCore) -> None:
        for i, p in enumerate(prompts):
            s.add(request(f"r{i}", p, max_new_tokens=5, ignore_eos=True))

    free = make()
    submit(free)
    want = run(free)

    s = make(max_running_requests=2)
    submit(s)
    sizes: list[int] = []
    results: dict[str, Result] = {}
    while s.has_work:
        collect(results, step(s))
        sizes.append(len(s.scheduler.running))
    assert max(sizes) == 2
    assert tokens(results) == tokens(want)
    assert all(r.finish_reason == {"type": "length", "length": 5} for r in results.values())


def test_queue_time_is_the_wait_before_first_admission(make: Make) -> None:
    """A request held back by max_running_requests reports a longer queue time than the one
    admitted at once; every output carries its request's queue time."""
    s = make(max_running_requests=1)
    s.add(request("first", ids(12, seed=1), max_new_tokens=6, ignore_eos=True))
    s.add(request("second", ids(12, seed=2), max_new_tokens=2, ignore_eos=True))
    queue_times: dict[str, set[float | None]] = {}
    while s.has_work:
        for o in step(s):
            queue_times.setdefault(o.rid, set()).add(o.queue_time)
    (first,), (second,) = queue_times["first"], queue_times["second"]
    assert first is not None and second is not None
    assert 0 <= first < second


def test_chunked_prefill_keeps_every_forward_within_the_budget(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [ids(45, seed=1), ids(7, seed=2), ids(26, seed=3)]

    def submit(s: EngineCore) -> None:
        for i, p in enumerate(prompts):
            s.add(request(f"r{i}", p, max_new_tokens=6, ignore_eos=True))

    whole = make()
    submit(whole)
    want = run(whole)

    s = make(chunked_prefill_size=16)
    sizes: list[int] = []
    real = s.runner.forward

    def forward(seqs: list[ScheduledSeq]) -> torch.Tensor:
        sizes.append(sum(len(q.new_ids) for q in seqs))
        return real(seqs)

    monkeypatch.setattr(s.runner, "forward", forward)
    submit(s)
    got = run(s)
    assert max(sizes) <= 16 and sizes.count(16) >= 3, sizes  # prefill tokens plus decodes
    assert tokens(got) == tokens(want)


def test_retraction_keeps_outputs_and_every_slot_owned(make: Make) -> None:
    """Six requests of 42 tokens each on a 120-slot pool: running ones are sent back to the
    queue and resume; greedy tokens are those of a run with room for all."""
    prompts = [ids(12, seed=20 + i) for i in range(6)]

    def submit(s: EngineCore) -> None:
        for i, p in enumerate(prompts):
            s.add(request(f"r{i}", p, max_new_tokens=30, ignore_eos=True))

    roomy = make()
    submit(roomy)
    want = run(roomy)

    s = make(max_total_tokens=120)
    submit(s)
    got = run(s, max_steps=2000)
    assert s.scheduler.num_retractions > 0
    assert tokens(got) == tokens(want)
    assert all(r.finish_reason == {"type": "length", "length": 30} for r in got.values())


def test_a_request_that_outgrows_the_pool_is_aborted_and_others_finish(make: Make) -> None:
    """Admitted, then alone and out of slots: it ends with an abort naming the pool; the slots
    it held are released and a neighbour's output is unaffected."""
    small = ids(5, seed=5)
    roomy = make()
    roomy.add(request("small", small, max_new_tokens=3))
    want = run(roomy)["small"].output_ids

    s = make(max_total_tokens=64)
    s.add(request("big", ids(10, seed=6), max_new_tokens=60, ignore_eos=True))
    s.add(request("small", small, max_new_tokens=3))
    results = run(s)
    big = results["big"]
    assert big.finish_reason is not None and big.finish_reason["type"] == "abort"
    assert "64 KV slots" in big.finish_reason["message"]
    assert 0 < len(big.output_ids) < 60
    assert results["small"].output_ids == want
    assert results["small"].finish_reason == {"type": "length", "length": 3}
    assert s.scheduler.allocator.num_free + s.scheduler.cache.evictable_size == 64


def test_a_prompt_longer_than_the_pool_is_rejected_at_once(make: Make) -> None:
    s = make(max_total_tokens=32)
    s.add(request("long", ids(40, seed=1)))
    outs = step(s)
    assert [o.rid for o in outs] == ["long"] and outs[0].finish_reason is not None
    reason = outs[0].finish_reason
    assert reason is not None and reason.is_abort
    assert "KV cache holds only 32" in reason.message
    assert not s.has_work


def test_a_request_asking_for_more_tokens_than_the_pool_holds_still_runs(make: Make) -> None:
    s = make(max_total_tokens=64)
    s.add(request("greedy", ids(20, seed=7), max_new_tokens=128, ignore_eos=True))
    results = run(s, max_steps=200)
    r = results["greedy"]
    assert r.output_ids and r.finish_reason is not None
    assert r.finish_reason["type"] in ("length", "abort")


# ---- abort ---------------------------------------------------------------------------------


def test_abort_releases_running_and_waiting_requests(make: Make) -> None:
    s = make(max_running_requests=1)
    s.add(request("a", ids(20, seed=1), max_new_tokens=50, ignore_eos=True))
    s.add(request("b", ids(20, seed=2), max_new_tokens=50, ignore_eos=True))
    results: dict[str, Result] = {}
    for _ in range(3):
        collect(results, step(s))
    assert running(s) == ["a"] and [r.rid for r in s.scheduler.waiting] == ["b"]
    s.abort("a")
    s.abort("b")
    s.check_invariant()
    collect(results, step(s))
    assert not s.has_work
    for rid in ("a", "b"):
        reason = results[rid].finish_reason
        assert reason is not None and reason["type"] == "abort", rid
    assert len(results["a"].output_ids) == 3 and results["b"].output_ids == []
    assert (
        s.scheduler.allocator.num_free + s.scheduler.cache.evictable_size
        == s.scheduler.allocator.num_slots
    )


# ---- the message loop ----------------------------------------------------------------------


def test_a_request_that_cannot_be_taken_in_ends_alone_and_the_loop_goes_on(make: Make) -> None:
    """A malformed message (no sampling params) ends its own request with an abort; the loop
    serves the next request and stops when told."""
    s = make()
    broken = GenerateRequest("broken", ids(6, seed=1), None)  # type: ignore[arg-type]
    inbox: list[list[Any]] = [[broken, request("good", ids(6, seed=2))]]
    emitted: list[Any] = []

    def receive(block: bool) -> list[Any]:
        if inbox:
            return inbox.pop(0)
        done = any(isinstance(o, TokenOutput) and o.rid == "good" and o.finished for o in emitted)
        return [None] if done else []

    s.run(receive, emitted.extend)
    outs = [o for o in emitted if isinstance(o, TokenOutput)]
    bad = [o for o in outs if o.rid == "broken"]
    assert len(bad) == 1 and bad[0].finish_reason is not None and bad[0].finish_reason.is_abort
    assert "internal error" in bad[0].finish_reason.message
    assert sum(len(o.new_ids) for o in outs if o.rid == "good") == 4
    s.check_invariant()
