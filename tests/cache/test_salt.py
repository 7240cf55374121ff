"""Salted namespaces in the radix cache against a naive model: each cached token is keyed by
(namespace, token), the namespace being shared below the public boundary and the salt's above."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.speculative.tree import cached_continuation
from tests.cache.test_radix import assert_no_leak, make, nodes, take

Key = tuple[tuple[str | None, int], ...]


def namespaced(ids: list[int], salt: str | None, public_len: int) -> Key:
    return tuple((None if salt is None or i < public_len else salt, t) for i, t in enumerate(ids))


def serve(cache: RadixCache, ids: list[int], salt: str | None, public_len: int) -> int:
    """Run one request to completion as the scheduler does; returns its cached tokens."""
    m = cache.match_prefix(ids, salt=salt, public_len=public_len)
    cache.lock(m.node)
    slots = torch.cat([m.slots, take(cache.allocator, len(ids) - m.slots.numel())])
    cache.cache_finished(ids, slots, m.node, salt=salt, public_len=public_len)
    return int(m.slots.numel())


requests = st.lists(
    st.tuples(
        st.lists(st.integers(0, 2), min_size=1, max_size=8),
        st.sampled_from([None, "a", "b"]),
        st.integers(0, 4),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(requests)
def test_matches_follow_the_naive_namespaced_model(reqs: list) -> None:
    alloc, cache = make(num_slots=128)
    held: dict[Key, int] = {}  # every cached namespaced prefix -> its slot
    for ids, salt, public_len in reqs:
        key = namespaced(ids, salt, public_len)
        expected = next(k for k in range(len(ids), -1, -1) if k == 0 or key[:k] in held)
        m = cache.match_prefix(ids, salt=salt, public_len=public_len)
        assert m.slots.numel() == expected
        assert m.slots.tolist() == [held[key[: k + 1]] for k in range(expected)]
        assert serve(cache, ids, salt, public_len) == expected
        m = cache.match_prefix(ids, salt=salt, public_len=public_len)
        for k in range(len(ids)):
            held.setdefault(key[: k + 1], int(m.slots[k]))
        assert m.slots.tolist() == [held[key[: k + 1]] for k in range(len(ids))]
        assert_no_leak(alloc, cache)
    assert cache.total_size() == len(held)


def test_salts_share_nothing_but_the_public_prefix() -> None:
    alloc, cache = make()
    prompt = [5, 6, 7, 8, 9]
    assert serve(cache, prompt, "acme", 2) == 0
    assert serve(cache, prompt, "acme", 2) == 5
    assert serve(cache, prompt, "beta", 2) == 2  # the public part only
    assert serve(cache, prompt, "beta", 0) == 0  # no public boundary: isolated from token one
    assert serve(cache, prompt, None, 0) == 2  # unsalted requests see the shared part only
    assert serve(cache, prompt, "acme", 2) == 5
    assert_no_leak(alloc, cache)


def test_a_shared_edge_straddling_the_boundary_is_split_at_it() -> None:
    alloc, cache = make()
    serve(cache, [1, 2, 3, 4], None, 0)
    assert serve(cache, [1, 2, 3, 4], "t", 3) == 3
    top = cache.root.children[1]
    assert top.key == [1, 2, 3] and top.salt is None
    assert {c.salt for c in top.children.values()} == {None, "t"}
    assert_no_leak(alloc, cache)


def test_salted_leaves_evict_and_are_not_reported() -> None:
    alloc, cache = make(num_slots=16)
    events: list[tuple[str, list[int], int]] = []
    cache.on_change = lambda kind, ids, n: events.append((kind, ids, n))
    serve(cache, [1, 2, 3, 4], "t", 2)
    assert events == [("insert", [1, 2], 0)]  # only the shared part is anyone else's business
    serve(cache, [9, 9], "t", 0)
    assert len(events) == 1
    assert cache.evict(100) == 6
    assert events[1:] == [("remove", [1, 2], 0)]
    assert cache.snapshot() == [] and cache.evicted_tokens == 6
    assert_no_leak(alloc, cache)


def test_pinned_path_survives_eviction_until_unpinned() -> None:
    alloc, cache = make(num_slots=16)
    serve(cache, [1, 2, 3], "t", 0)
    serve(cache, [4, 5], None, 0)
    m = cache.match_prefix([1, 2, 3], salt="t")
    cache.pin(m.node)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3], salt="t").slots.numel() == 3
    assert m.node.pin_ref == 1
    cache.unpin(m.node)
    assert cache.evict(100) == 3 and cache.total_size() == 0
    assert_no_leak(alloc, cache)


def test_disabled_cache_ignores_salts() -> None:
    alloc = SlotAllocator(8, check=True)
    cache = RadixCache(alloc, disable=True)
    assert serve(cache, [1, 2], "t", 1) == 0
    assert serve(cache, [1, 2], "t", 1) == 0
    assert_no_leak(alloc, cache)


@settings(max_examples=100, deadline=None)
@given(requests, st.lists(st.integers(0, 2), min_size=0, max_size=6), st.sampled_from([None, "a"]))
def test_continuations_stay_in_the_callers_namespace(reqs: list, probe: list[int], salt) -> None:
    alloc, cache = make(num_slots=128)
    held: set[Key] = set()
    for ids, s, public_len in reqs:
        serve(cache, ids, s, public_len)
        key = namespaced(ids, s, public_len)
        held.update(key[: k + 1] for k in range(len(ids)))
    public_len = min(2, len(probe))
    ticks = [n.last_access for n in nodes(cache)]
    before = cache.snapshot()
    out = cached_continuation(cache.root, probe, 0, 5, salt, public_len)
    assert len(out) <= 5
    if out:  # what the tree holds after probe, as this caller would match it
        full = namespaced(probe + out, salt, public_len)
        assert all(full[: k + 1] in held for k in range(len(full)))
    assert cache.snapshot() == before and [n.last_access for n in nodes(cache)] == ticks
    assert_no_leak(alloc, cache)


def test_a_continuation_never_crosses_salts() -> None:
    alloc, cache = make()
    serve(cache, [1, 2, 3, 4, 5], "a", 2)
    serve(cache, [1, 2, 3, 9, 9, 9], "b", 2)
    assert cached_continuation(cache.root, [1, 2], 0, 4, "a", 2) == [3, 4, 5]
    assert cached_continuation(cache.root, [1, 2], 0, 4, "b", 2) == [3, 9, 9, 9]
    assert cached_continuation(cache.root, [1, 2, 3], 0, 4, "c", 2) == []
    assert cached_continuation(cache.root, [1], 0, 4) == [2]  # unsalted: the shared part only
    assert_no_leak(alloc, cache)
