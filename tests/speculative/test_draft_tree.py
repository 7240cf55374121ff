"""Radix-tree drafts against a naive reference: the cached sequences as plain lists."""

from __future__ import annotations

import random

import pytest
import torch

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.speculative.tree import SuffixIndex, cached_continuation, continuation


def insert(cache: RadixCache, ids: list[int]) -> None:
    """Cache ids as a finished request would (slots from the free list)."""
    match = cache.match_prefix(ids)
    cache.lock(match.node)
    new = cache.allocator.alloc(len(ids) - len(match.slots))
    assert new is not None
    cache.cache_finished(ids, torch.cat([match.slots, new]), match.node)


def followers(seqs: list[list[int]], ids: list[int], n: int) -> set[tuple[int, ...]]:
    """Every continuation of length n (or to the end) that a cached sequence gives the suffix
    ids[-n_gram:] ... here: the prefix ids."""
    return {tuple(s[len(ids) : len(ids) + n]) for s in seqs if s[: len(ids)] == ids}


def test_cached_continuation_follows_the_tree_and_stops_where_it_diverges() -> None:
    cache = RadixCache(SlotAllocator(256))
    insert(cache, [1, 2, 3, 4, 5, 6, 7])
    insert(cache, [1, 2, 3, 9, 9])
    root = cache.root
    assert cached_continuation(root, [1, 2], 0, 3) == [3, 4, 5] or cached_continuation(
        root, [1, 2], 0, 3
    ) == [3, 9, 9]
    # the most recently used branch wins
    cache.match_prefix([1, 2, 3, 9])
    assert cached_continuation(root, [1, 2, 3], 0, 4) == [9, 9]
    cache.match_prefix([1, 2, 3, 4, 5])
    assert cached_continuation(root, [1, 2, 3], 0, 4) == [4, 5, 6, 7]
    assert cached_continuation(root, [1, 2, 3, 4, 5, 6, 7], 0, 4) == []
    assert cached_continuation(root, [1, 2, 8], 0, 4) == []
    # from a locked node: ids[:start] is its path
    node = cache.match_prefix([1, 2, 3]).node
    assert cached_continuation(node, [1, 2, 3, 4], 3, 2) == [5, 6]


@pytest.mark.parametrize("seed", range(5))
def test_suffix_index_against_the_cached_sequences(seed: int) -> None:
    """Every draft is what followed a suffix n-gram of the query in a sequence the tree still
    holds; and most queries whose 4-gram a held sequence continues get one (the index keeps
    the latest few places of each n-gram)."""
    rng = random.Random(seed)
    cache = RadixCache(SlotAllocator(400))
    index = SuffixIndex(cache)
    cached: list[list[int]] = []
    asked = found = 0
    for _ in range(60):
        prefix = rng.choice(cached)[: rng.randint(0, 10)] if cached and rng.random() < 0.5 else []
        seq = prefix + [rng.randint(0, 7) for _ in range(rng.randint(3, 20))]
        if cache.allocator.num_free < len(seq):
            cache.evict(len(seq))
        insert(cache, seq)
        cached = [s for s in cached if _held(cache, s)] + [seq]
        for _ in range(10):
            src = rng.choice(cached)
            if len(src) < 6:
                continue
            end = rng.randint(4, len(src) - 1)
            query = [rng.randint(0, 7) for _ in range(3)] + src[end - 4 : end]
            draft = index.draft(query, 3)
            asked, found = asked + 1, found + bool(draft)
            if draft:
                assert any(_follows(s, query, draft) for s in cached), (query, draft)
    assert found > 0.9 * asked
    index.rebuild()
    assert len(index) <= sum(len(s) for s in cached) * 3


def _held(cache: RadixCache, seq: list[int]) -> bool:
    """Whether the tree still holds all of seq."""
    return len(cache.match_prefix(seq).slots) == len(seq)


def _follows(seq: list[int], query: list[int], draft: list[int]) -> bool:
    """Whether seq has some suffix n-gram (n >= 2) of query followed by draft."""
    for n in (4, 3, 2):
        gram = query[-n:]
        for i in range(len(seq) - n - len(draft) + 1):
            if seq[i : i + n] == gram and seq[i + n : i + n + len(draft)] == draft:
                return True
    return False


def test_salt_filters_nodes() -> None:
    """A draft reads only nodes of the asking request's namespace, both ways: a tenant never
    drafts from the shared namespace past a public prefix nor from another tenant, and an
    unsalted request never drafts from a tenant's nodes."""
    cache = RadixCache(SlotAllocator(64))
    insert(cache, [1, 2, 3, 4, 5])
    node = cache.match_prefix([1, 2, 3, 4, 5]).node
    assert continuation(cache.root, 0, 3) == [1, 2, 3]
    assert continuation(node, 2, 3, salt=None) == [3, 4, 5]
    assert continuation(node, 2, 3, salt="tenant-a") == []
    assert cached_continuation(cache.root, [1], 0, 2, salt="tenant-a") == []
    # Tenant a's text after a public prefix [1, 2]; tenant b and unsalted requests see none of it.
    ids = [1, 2, 7, 8, 9]
    match = cache.match_prefix(ids, salt="tenant-a", public_len=2)
    assert match.node.depth == 2  # the shared [1, 2]
    cache.lock(match.node)
    new = cache.allocator.alloc(len(ids) - 2)
    assert new is not None
    slots = torch.cat([match.slots, new])
    cache.cache_finished(ids, slots, match.node, salt="tenant-a", public_len=2)
    assert cached_continuation(cache.root, [1, 2, 7], 0, 2, "tenant-a", 2) == [8, 9]
    assert cached_continuation(cache.root, [1, 2, 7], 0, 2, "tenant-b", 2) == []
    assert cached_continuation(cache.root, [1, 2], 0, 3, None, 0) == [3, 4, 5]
    index = SuffixIndex(cache)
    index.rebuild()
    assert index.draft([5, 1, 2, 7], 2, "tenant-a") == [8, 9]
    assert index.draft([5, 1, 2, 7], 2, "tenant-b") == []
    assert index.draft([5, 1, 2, 7], 2, None) == []
