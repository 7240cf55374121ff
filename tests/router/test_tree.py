"""The router's mirror of a worker's radix tree: replaying the cache's events gives its tree."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.engine.cache_events import CacheEventLog
from radixlm.router.tree import MirrorTree, _Node

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("serve"), tokens),
        st.tuples(st.just("match"), tokens),
        st.tuples(st.just("evict"), st.integers(1, 20)),
        st.tuples(st.just("flush"), st.just([])),
        st.tuples(st.just("drain"), st.booleans()),
    ),
    max_size=40,
)


def cache_prefixes(cache: RadixCache) -> set[tuple[int, ...]]:
    return {p for p in _prefixes(cache.root)}  # type: ignore[arg-type]


def _prefixes(root: object) -> set[tuple[int, ...]]:
    out: set[tuple[int, ...]] = set()
    stack = [(root, ())]
    while stack:
        node, path = stack.pop()
        for i in range(len(node.key)):  # type: ignore[attr-defined]
            out.add(path + tuple(node.key[: i + 1]))  # type: ignore[attr-defined]
        path = path + tuple(node.key)  # type: ignore[attr-defined]
        stack.extend((c, path) for c in node.children.values())  # type: ignore[attr-defined]
    return out


def serve(cache: RadixCache, ids: list[int]) -> None:
    m = cache.match_prefix(ids)
    cache.lock(m.node)
    new = cache.allocator.alloc(len(ids) - m.slots.numel())
    if new is None:
        cache.evict(len(ids))
        new = cache.allocator.alloc(len(ids) - m.slots.numel())
    if new is None:  # locked prefix too big for the pool: give up on this request
        cache.unlock(m.node)
        return
    cache.cache_finished(ids, torch.cat([m.slots, new]), m.node)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_mirror_replays_the_cache_exactly(script: list[tuple[str, object]]) -> None:
    cache = RadixCache(SlotAllocator(24))
    log = CacheEventLog(cache, max_tokens=40)  # small: overflows resync by snapshot
    mirror = MirrorTree()
    mirror.apply_batch(log.drain())
    for op, arg in script:
        if op == "serve":
            serve(cache, list(arg))  # type: ignore[call-overload]
        elif op == "match":
            cache.match_prefix(list(arg))  # type: ignore[call-overload]
        elif op == "evict":
            cache.evict(arg)  # type: ignore[arg-type]
        elif op == "flush":
            cache.flush()
        else:
            mirror.apply_batch(log.drain(bool(arg)))
            assert _prefixes(mirror.root) == _prefixes(cache.root)
            assert mirror.num_tokens == cache.total_size()
    mirror.apply_batch(log.drain())
    assert _prefixes(mirror.root) == _prefixes(cache.root)
    for op, arg in script:
        if op in ("serve", "match"):
            ids = list(arg)  # type: ignore[call-overload]
            assert mirror.match(ids) == cache.match_prefix(ids).slots.numel()


@settings(max_examples=200, deadline=None)
@given(st.lists(tokens, max_size=10), st.lists(st.tuples(tokens, st.integers(0, 11)), max_size=5))
def test_mirror_against_a_set_of_sequences(
    inserts: list[list[int]], removes: list[tuple[list[int], int]]
) -> None:
    mirror, model = MirrorTree(), set[tuple[int, ...]]()
    for ids in inserts:
        mirror.insert(ids)
        model |= {tuple(ids[: i + 1]) for i in range(len(ids))}
    for path, keep in removes:
        mirror.remove(path, keep)
        head = tuple(path[: keep + 1])
        if keep < len(path):
            model = {s for s in model if s[: keep + 1] != head}
    assert _prefixes(mirror.root) == model
    assert mirror.num_tokens == len(model)
    for ids in inserts:
        expected = max((len(s) for s in model if tuple(ids[: len(s)]) == s), default=0)
        assert mirror.match(ids) == expected


def test_snapshot_round_trip() -> None:
    cache = RadixCache(SlotAllocator(64))
    for ids in ([1, 2, 3, 4], [1, 2, 5], [7, 8], [1, 2, 3, 9, 9]):
        serve(cache, ids)
    mirror = MirrorTree()
    mirror.load(cache.snapshot())
    assert _prefixes(mirror.root) == _prefixes(cache.root)
    assert isinstance(mirror.root, _Node)
