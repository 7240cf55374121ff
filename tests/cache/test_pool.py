"""KVPool shapes and the slot allocator, checked against a set of free ids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.cache import KVPool, SlotAllocator


def test_pool_shapes_and_padding_slot() -> None:
    pool = KVPool(10, num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16, device="cpu")
    assert pool.num_slots == 10
    assert len(pool.k) == len(pool.v) == 3
    for t in (*pool.k, *pool.v):
        assert t.shape == (2, 11, 4) and t.dtype == torch.float16
        assert not t[:, 0].any()  # padded reads of slot 0 must be finite
    per_slot = KVPool.bytes_per_slot(3, 2, 4, torch.float16)
    assert per_slot == 2 * 3 * 2 * 4 * 2
    assert pool.nbytes == per_slot * 11


def test_alloc_all_distinct_and_never_zero() -> None:
    alloc = SlotAllocator(100)
    got = [alloc.alloc(n) for n in (1, 30, 0, 69)]
    assert all(s is not None and s.dtype == torch.int64 for s in got)
    ids = torch.cat([s for s in got if s is not None])
    assert sorted(ids.tolist()) == list(range(1, 101))
    assert alloc.num_free == 0


def test_alloc_too_many_changes_nothing() -> None:
    alloc = SlotAllocator(8)
    first = alloc.alloc(5)
    assert first is not None
    before = alloc.free_slots().tolist()
    assert alloc.alloc(4) is None
    assert alloc.num_free == 3
    assert alloc.free_slots().tolist() == before
    assert alloc.alloc(3) is not None


def test_freed_slots_are_reused_and_caller_tensor_is_copied() -> None:
    alloc = SlotAllocator(4)
    a = alloc.alloc(4)
    assert a is not None
    table = a.clone()
    alloc.free(table[1:3])  # a view, as a request table row would be
    table.zero_()  # the caller reuses its table; the free list must not change
    b = alloc.alloc(2)
    assert b is not None
    assert sorted(b.tolist()) == sorted(a[1:3].tolist())


def test_reset() -> None:
    alloc = SlotAllocator(6)
    assert alloc.alloc(6) is not None
    alloc.reset()
    assert alloc.num_free == 6
    assert sorted(alloc.free_slots().tolist()) == list(range(1, 7))


def test_check_mode_catches_double_free_and_bad_ids() -> None:
    alloc = SlotAllocator(6, check=True)
    s = alloc.alloc(3)
    assert s is not None
    alloc.free(s[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(s[:2])
    with pytest.raises(ValueError, match="twice"):
        alloc.free(torch.tensor([s[1], s[1]]))
    with pytest.raises(ValueError, match="outside"):
        alloc.free(torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        alloc.free(torch.tensor([7]))
    alloc.free(s[1:])
    assert alloc.num_free == 6


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=40))
def test_allocator_matches_a_set(ops: list[tuple[bool, int]]) -> None:
    alloc = SlotAllocator(20, check=True)
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc:
            got = alloc.alloc(n)
            if n > 20 - len(held):
                assert got is None
            else:
                assert got is not None and got.numel() == n
                held.extend(got.tolist())
        else:
            n = min(n, len(held))
            alloc.free(torch.tensor(held[:n], dtype=torch.int64))
            del held[:n]
        free = alloc.free_slots().tolist()
        assert alloc.num_free == len(free) == 20 - len(held)
        assert sorted(free + held) == list(range(1, 21))
