"""The radix cache against a naive model: the set of cached token prefixes, one slot each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixlm.cache import RadixCache, SlotAllocator, TreeNode
from radixlm.cache.radix import common_prefix_len


def make(num_slots: int = 64, disable: bool = False) -> tuple[SlotAllocator, RadixCache]:
    alloc = SlotAllocator(num_slots, check=True)
    return alloc, RadixCache(alloc, disable=disable)


def take(alloc: SlotAllocator, n: int) -> torch.Tensor:
    slots = alloc.alloc(n)
    assert slots is not None
    return slots


def serve(cache: RadixCache, ids: list[int]) -> torch.Tensor:
    """Run one request to completion the way the scheduler does; returns the slots it used."""
    m = cache.match_prefix(ids)
    cache.lock(m.node)
    slots = torch.cat([m.slots, take(cache.allocator, len(ids) - m.slots.numel())])
    cache.cache_finished(ids, slots, m.node)
    return slots


def nodes(cache: RadixCache) -> Iterator[TreeNode]:
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def prefixes(cache: RadixCache) -> set[tuple[int, ...]]:
    """Every token prefix the tree holds; each corresponds to exactly one slot."""
    out: set[tuple[int, ...]] = set()
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, path = stack.pop()
        for i in range(len(node.key)):
            out.add(path + tuple(node.key[: i + 1]))
        path += tuple(node.key)
        stack.extend((child, path) for child in node.children.values())
    return out


def edges(node: TreeNode) -> dict[tuple[int, ...], dict]:
    return {tuple(c.key): edges(c) for c in node.children.values()}


def assert_no_leak(alloc: SlotAllocator, cache: RadixCache, *private: torch.Tensor) -> None:
    held = torch.cat([alloc.free_slots(), cache.all_slots(), *private])
    assert sorted(held.tolist()) == list(range(1, alloc.num_slots + 1))


# --- structure ----------------------------------------------------------------------------


def test_match_inside_an_edge_splits_it() -> None:
    alloc, cache = make()
    slots = serve(cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 9])
    assert m.slots.tolist() == slots[:2].tolist()
    assert m.node.key == [1, 2] and m.node.depth == 2
    assert edges(cache.root) == {(1, 2): {(3, 4): {}}}
    assert cache.total_size() == 4 and cache.evictable_size == 4
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == slots.tolist()
    assert_no_leak(alloc, cache)


def test_insert_branching_inside_an_edge() -> None:
    alloc, cache = make()
    first = serve(cache, [1, 2, 3, 4])
    # A request that matched nothing (it started before the first finished): its copies of
    # [1, 2] duplicate the tree's and must be freed, the branch [5, 6] kept.
    own = take(alloc, 4)
    cache.cache_finished([1, 2, 5, 6], own, cache.root)
    assert edges(cache.root) == {(1, 2): {(3, 4): {}, (5, 6): {}}}
    assert cache.match_prefix([1, 2, 5, 6]).slots.tolist() == first[:2].tolist() + own[2:].tolist()
    assert alloc.num_free == 64 - 6
    assert_no_leak(alloc, cache)


def test_tree_keeps_its_own_copy_of_inserted_slots() -> None:
    alloc, cache = make()
    table = take(alloc, 3).clone()  # a request table row, reused once the request is done
    expected = table.tolist()
    cache.cache_finished([4, 5, 6], table, cache.root)
    table.fill_(0)
    assert cache.match_prefix([4, 5, 6]).slots.tolist() == expected


def test_finished_duplicate_request_frees_everything() -> None:
    alloc, cache = make()
    a, b = take(alloc, 3), take(alloc, 3)
    cache.cache_finished([7, 8, 9], a, cache.root)
    cache.cache_finished([7, 8, 9], b, cache.root)
    assert cache.match_prefix([7, 8, 9]).slots.tolist() == a.tolist()
    assert cache.total_size() == 3 and alloc.num_free == 61
    assert_no_leak(alloc, cache)


def test_cache_unfinished_moves_the_lock_and_returns_tree_slots() -> None:
    alloc, cache = make()
    shared = serve(cache, [1, 2])
    m = cache.match_prefix([1, 2, 3, 4, 5])
    cache.lock(m.node)
    mine = torch.cat([m.slots, take(alloc, 3)])
    other = take(alloc, 2)  # another request, also on [1, 2], caches [1, 2, 3, 4] first
    cache.lock(m.node)
    cache.cache_finished([1, 2, 3, 4], torch.cat([shared, other]), m.node)

    res = cache.cache_unfinished([1, 2, 3, 4], mine[:4], m.node)
    assert res.slots.tolist() == shared.tolist() + other.tolist()
    assert res.node.depth == 4 and res.node.lock_ref == 1 and m.node.lock_ref == 1
    assert cache.protected_size == 4 and cache.evictable_size == 0
    mine = torch.cat([res.slots, mine[4:]])  # the duplicates mine[2:4] were freed
    assert_no_leak(alloc, cache, mine[4:])
    cache.cache_finished([1, 2, 3, 4, 5], mine, res.node)
    assert cache.protected_size == 0 and cache.total_size() == 5
    assert_no_leak(alloc, cache)


# --- eviction and locks -------------------------------------------------------------------


def test_evict_least_recently_used_leaf_first() -> None:
    alloc, cache = make()
    serve(cache, [1, 1])
    b = serve(cache, [2, 2])
    serve(cache, [3, 3])
    cache.match_prefix([1, 1])  # touched: [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert prefixes(cache) == {(1,), (1, 1), (3,), (3, 3)}
    assert sorted(alloc.free_slots().tolist()[-2:]) == sorted(b.tolist())
    assert cache.evict(2) == 2 and prefixes(cache) == {(1,), (1, 1)}
    assert cache.evict(5) == 2 and cache.total_size() == 0
    assert_no_leak(alloc, cache)


def test_parent_becomes_evictable_after_its_last_child() -> None:
    alloc, cache = make()
    serve(cache, [1, 2, 3])
    serve(cache, [1, 2, 4])
    serve(cache, [9])
    assert edges(cache.root) == {(1, 2): {(3,): {}, (4,): {}}, (9,): {}}
    assert cache.evict(2) == 2  # leaves [3] then [4], both older than [9]
    assert edges(cache.root) == {(1, 2): {}, (9,): {}}
    assert cache.evict(1) == 2  # [1, 2] is now a leaf, still older than [9]
    assert edges(cache.root) == {(9,): {}}
    assert_no_leak(alloc, cache)


def test_locked_nodes_are_never_evicted_and_sizes_follow_locks() -> None:
    alloc, cache = make()
    serve(cache, [1, 2, 3])
    serve(cache, [1, 2, 4, 5])
    leaf = cache.match_prefix([1, 2, 3]).node
    mid = leaf.parent
    assert mid is not None and mid.key == [1, 2]
    assert (cache.evictable_size, cache.protected_size) == (5, 0)
    cache.lock(leaf)
    cache.lock(mid)
    assert (cache.evictable_size, cache.protected_size) == (2, 3)
    assert cache.evict(100) == 2  # only [4, 5]
    assert (cache.evictable_size, cache.protected_size) == (0, 3)
    cache.unlock(leaf)
    assert (cache.evictable_size, cache.protected_size) == (1, 2)
    assert cache.evict(100) == 1 and edges(cache.root) == {(1, 2): {}}
    cache.unlock(mid)
    assert (cache.evictable_size, cache.protected_size) == (2, 0)
    assert cache.evict(100) == 2
    assert_no_leak(alloc, cache)


def test_stale_heap_entries_stay_bounded() -> None:
    _, cache = make()
    serve(cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    for _ in range(1000):
        cache.lock(node)
        cache.unlock(node)
    assert len(cache._heap) <= 2 * 1 + 64
    assert cache.evict(100) == 2  # the rebuilt heap still holds the leaf


# --- flush and disable ----------------------------------------------------------------------


def test_flush_refuses_while_locked_then_frees_everything() -> None:
    alloc, cache = make()
    serve(cache, [1, 2, 3])
    serve(cache, [4])
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    assert cache.flush() is False
    assert cache.total_size() == 4 and alloc.num_free == 60
    cache.unlock(node)
    assert cache.flush() is True
    assert cache.total_size() == cache.evictable_size == 0 and alloc.num_free == 64
    assert cache.match_prefix([1, 2, 3]).slots.numel() == 0
    assert node.parent is None  # stale handles read as evicted
    assert_no_leak(alloc, cache)


def test_disabled_cache_holds_nothing() -> None:
    alloc, cache = make(disable=True)
    serve(cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    assert m.slots.numel() == 0 and m.node is cache.root
    slots = take(alloc, 3)
    res = cache.cache_unfinished([1, 2, 3], slots, cache.root)
    assert res.slots is slots and res.node is cache.root
    cache.cache_finished([1, 2, 3], slots, res.node)
    assert cache.total_size() == 0 and alloc.num_free == 64
    assert_no_leak(alloc, cache)


def test_tensor_ids_are_rejected() -> None:
    _, cache = make()
    with pytest.raises(TypeError):
        cache.match_prefix(torch.tensor([1, 2]))  # type: ignore[arg-type]


def test_common_prefix_len_every_mismatch_position() -> None:
    for n in range(70):
        key = list(range(n))
        for cut in range(n + 1):
            ids = [-1, *key[:cut], -2, *key[cut + 1 :]]
            assert common_prefix_len(key, ids, 1) == cut
            assert common_prefix_len(key, ids[: cut + 1], 1) == cut  # ids end first


@given(
    st.lists(st.integers(0, 2), max_size=100),
    st.integers(0, 100),
    st.lists(st.integers(0, 2), max_size=20),
    st.integers(0, 5),
)
def test_common_prefix_len(key: list[int], cut: int, tail: list[int], start: int) -> None:
    ids = [9] * start + key[:cut] + tail  # long shared runs exercise the bisection
    naive = 0
    while naive < min(len(key), len(ids) - start) and key[naive] == ids[start + naive]:
        naive += 1
    assert common_prefix_len(key, ids, start) == naive


# --- the state machine --------------------------------------------------------------------

NUM_SLOTS = 24
TOKENS = st.integers(0, 2)  # a tiny alphabet, so that prefixes collide often
SEQS = st.lists(TOKENS, min_size=1, max_size=8)


@dataclass(eq=False)
class Request:
    ids: list[int]
    slots: torch.Tensor  # slots[: node.depth] are the tree's, the rest private
    node: TreeNode  # locked by this request


class CacheMachine(RuleBasedStateMachine):
    """Random requests against the cache; the model is the set of cached prefixes."""

    disable = False

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlotAllocator(NUM_SLOTS, check=True)
        self.cache = RadixCache(self.alloc, disable=self.disable)
        self.cached: set[tuple[int, ...]] = set()
        self.running: list[Request] = []
        # Fake KV content: the (token, position) each slot was written for.
        self.token_of = torch.full((NUM_SLOTS + 1,), -1)
        self.pos_of = torch.full((NUM_SLOTS + 1,), -1)
        # LRU model: the last operation that used each cached prefix (a match or an insert of
        # a sequence it starts).
        self.clock = 0
        self.last_use: dict[tuple[int, ...], int] = {}

    def use(self, ids: list[int]) -> None:
        """An operation walked ids: every cached prefix of it was used now."""
        self.clock += 1
        for i in range(len(ids)):
            if tuple(ids[: i + 1]) in self.cached:
                self.last_use[tuple(ids[: i + 1])] = self.clock

    def write(self, slots: torch.Tensor, ids: list[int], start: int) -> None:
        self.token_of[slots] = torch.tensor(ids[start:], dtype=torch.int64)
        self.pos_of[slots] = torch.arange(start, len(ids))

    def assert_content(self, slots: torch.Tensor, ids: list[int]) -> None:
        assert self.token_of[slots].tolist() == ids[: slots.numel()]
        assert self.pos_of[slots].tolist() == list(range(slots.numel()))

    def expected_match(self, ids: list[int]) -> int:
        n = 0
        while n < len(ids) and tuple(ids[: n + 1]) in self.cached:
            n += 1
        return n

    def add(self, ids: list[int]) -> None:
        if not self.disable:
            self.cached.update(tuple(ids[: i + 1]) for i in range(len(ids)))

    def alloc_or_evict(self, n: int) -> torch.Tensor | None:
        slots = self.alloc.alloc(n)
        if slots is None:
            self.do_evict(n - self.alloc.num_free)
            slots = self.alloc.alloc(n)
        return slots

    def do_evict(self, n: int) -> None:
        before, evictable = prefixes(self.cache), self.cache.evictable_size
        freed = self.cache.evict(n)
        after = prefixes(self.cache)
        assert after <= before and freed == len(before) - len(after)
        assert self.cache.evictable_size == evictable - freed
        if freed < n:
            assert self.cache.evictable_size == 0, "an evictable node was not found"
        self.cached = after
        # Least recently used first: nothing evicted was used after a leaf that stays evictable.
        locked = {tuple(r.ids[: i + 1]) for r in self.running for i in range(r.node.depth)}
        parents = {q[:-1] for q in after}
        leaves = [q for q in after if q not in parents and q not in locked]
        evicted = before - after
        if evicted and leaves:
            newest = max(self.last_use[e] for e in evicted)
            assert newest <= min(self.last_use[q] for q in leaves), "a more recent leaf went first"

    def pick(self, data: st.DataObject) -> Request:
        return self.running[data.draw(st.integers(0, len(self.running) - 1))]

    @rule(ids=SEQS)
    def start(self, ids: list[int]) -> None:
        m = self.cache.match_prefix(ids)
        self.use(ids)
        assert m.slots.numel() == m.node.depth == self.expected_match(ids)
        self.assert_content(m.slots, ids)
        self.cache.lock(m.node)
        new = self.alloc_or_evict(len(ids) - m.slots.numel())
        if new is None:
            self.cache.unlock(m.node)
            return
        self.write(new, ids, m.slots.numel())
        self.running.append(Request(ids, torch.cat([m.slots, new]), m.node))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), extra=st.lists(TOKENS, min_size=1, max_size=3))
    def decode(self, data: st.DataObject, extra: list[int]) -> None:
        req = self.pick(data)
        new = self.alloc_or_evict(len(extra))
        if new is not None:
            req.ids = req.ids + extra
            self.write(new, req.ids, req.slots.numel())
            req.slots = torch.cat([req.slots, new])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        req = self.pick(data)
        self.running.remove(req)
        self.cache.cache_finished(req.ids, req.slots, req.node)
        self.add(req.ids)
        self.use(req.ids)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def cache_progress(self, data: st.DataObject) -> None:
        req = self.pick(data)
        cut = data.draw(st.integers(req.node.depth, len(req.ids)))
        res = self.cache.cache_unfinished(req.ids[:cut], req.slots[:cut], req.node)
        assert res.slots.numel() == cut
        self.assert_content(res.slots, req.ids)
        if not self.disable:
            assert res.node.depth == cut
        self.add(req.ids[:cut])
        self.use(req.ids[:cut])
        req.slots = torch.cat([res.slots, req.slots[cut:]])
        req.node = res.node

    @rule(ids=SEQS)
    def match(self, ids: list[int]) -> None:
        m = self.cache.match_prefix(ids)
        self.use(ids)
        assert m.slots.numel() == m.node.depth == self.expected_match(ids)
        self.assert_content(m.slots, ids)

    @rule(n=st.integers(0, NUM_SLOTS))
    def evict(self, n: int) -> None:
        self.do_evict(n)

    @rule()
    def flush(self) -> None:
        locked = any(req.node is not self.cache.root for req in self.running)
        before = prefixes(self.cache)
        assert self.cache.flush() is not locked
        if locked:
            assert prefixes(self.cache) == before
        else:
            self.cached = set()

    @invariant()
    def every_slot_in_exactly_one_place(self) -> None:
        free, tree = self.alloc.free_slots(), self.cache.all_slots()
        private = [req.slots[req.node.depth :] for req in self.running]
        held = torch.cat([free, tree, *private])
        assert sorted(held.tolist()) == list(range(1, NUM_SLOTS + 1))
        assert self.alloc.num_free == free.numel()
        assert self.cache.total_size() == tree.numel() == len(self.cached)

    @invariant()
    def tree_matches_model(self) -> None:
        assert prefixes(self.cache) == self.cached
        locks: Counter[int] = Counter()
        for req in self.running:
            assert req.node is self.cache.root or req.node.parent is not None, "lock lost"
            node: TreeNode | None = req.node
            while node is not None and node is not self.cache.root:
                locks[id(node)] += 1
                node = node.parent
        protected = 0
        for node in nodes(self.cache):
            # Each slot carries the token and position its node says it holds.
            start = node.depth - len(node.key)
            assert self.token_of[node.value].tolist() == node.key
            assert self.pos_of[node.value].tolist() == list(range(start, node.depth))
            assert node.lock_ref == locks[id(node)]
            protected += len(node.key) if node.lock_ref else 0
        assert self.cache.protected_size == protected
        assert self.cache.evictable_size == self.cache.total_size() - protected

    @invariant()
    def requests_see_their_own_tokens(self) -> None:
        for req in self.running:
            assert req.slots.numel() == len(req.ids)
            self.assert_content(req.slots, req.ids)

    def teardown(self) -> None:
        for req in self.running:
            self.cache.cache_finished(req.ids, req.slots, req.node)
        assert self.cache.protected_size == 0
        assert self.cache.flush()
        assert self.alloc.num_free == NUM_SLOTS


class DisabledCacheMachine(CacheMachine):
    """The same requests with caching off: nothing is ever shared, nothing leaks."""

    disable = True


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
DisabledCacheMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None
)
TestCacheMachine = CacheMachine.TestCase
TestDisabledCacheMachine = DisabledCacheMachine.TestCase
