"""Pins: quota, expiry by the clock, eviction skipping pinned paths, unpinning by owner only."""

from __future__ import annotations

import pytest

from radixlm.cache.pins import PinQuotaExceeded, PinTable
from tests.cache.test_radix import assert_no_leak, make
from tests.cache.test_salt import serve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pin_holds_against_eviction_until_its_ttl() -> None:
    alloc, cache = make(num_slots=16)
    clock = Clock()
    pins = PinTable(cache, clock)
    serve(cache, [1, 2, 3, 4], "acme", 0)
    assert pins.pin([1, 2, 3, 4], "acme", ttl_s=10, quota_tokens=8, salt="acme") is not None
    assert cache.evict(100) == 0
    clock.now += 9.9
    assert pins.expire() == 0
    clock.now += 0.2  # the owner never comes back: the clock alone ends the pin
    assert pins.expire() == 1 and len(pins) == 0
    assert cache.evict(100) == 4
    assert_no_leak(alloc, cache)


def test_pin_needs_the_whole_prefix_cached_under_its_salt() -> None:
    alloc, cache = make(num_slots=16)
    pins = PinTable(cache, Clock())
    serve(cache, [1, 2, 3], "acme", 0)
    assert pins.pin([1, 2, 3, 4], "acme", 10, 7, salt="acme") is None
    assert pins.pin([1, 2, 3], "beta", 10, 8, salt="beta") is None  # another tenant's K/V
    assert len(pins) == 0 and cache.protected_size == 0
    assert_no_leak(alloc, cache)


def test_quota_is_per_tenant_and_counts_whole_paths() -> None:
    alloc, cache = make(num_slots=32)
    pins = PinTable(cache, Clock())
    serve(cache, [1, 2, 3, 4, 5], "acme", 0)
    serve(cache, [1, 2, 3, 4, 5], "beta", 0)
    first = pins.pin([1, 2, 3], "acme", 10, 7, salt="acme")
    assert first is not None and first.tokens == 3
    with pytest.raises(PinQuotaExceeded):
        pins.pin([1, 2, 3, 4, 5], "acme", 10, 7, salt="acme")
    assert pins.tenant_tokens("acme") == 3
    assert pins.pin([1, 2, 3, 4, 5], "beta", 10, 7, salt="beta") is not None
    with pytest.raises(ValueError):
        pins.pin([1, 2, 3], "acme", 0, 8, salt="acme")
    assert not pins.unpin(first.pin_id, tenant="beta")  # not beta's pin
    assert pins.unpin(first.pin_id, tenant="acme")
    assert not pins.unpin(first.pin_id)
    assert pins.pin([1, 2, 3, 4, 5], "acme", 10, 7, salt="acme") is not None
    assert [p.tenant for p in pins.list()] == ["beta", "acme"]
    assert [p.tenant for p in pins.list("beta")] == ["beta"]
    pins.clear()
    assert cache.protected_size == 0 and cache.flush()
    assert_no_leak(alloc, cache)


def test_a_split_below_a_pin_keeps_the_pinned_path_whole() -> None:
    alloc, cache = make(num_slots=16)
    pins = PinTable(cache, Clock())
    serve(cache, [1, 2, 3, 4], None, 0)
    assert pins.pin([1, 2, 3, 4], "admin", 10, 8) is not None
    serve(cache, [1, 2, 7], None, 0)  # splits the pinned edge
    assert cache.evict(100) == 1  # only the unpinned branch [7]
    assert cache.match_prefix([1, 2, 3, 4]).slots.numel() == 4
    pins.clear()
    assert_no_leak(alloc, cache)
