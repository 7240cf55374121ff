"""The encoder-output cache: hits and misses, LRU eviction within its byte budget."""

from __future__ import annotations

import torch

from radixlm.cache.encoder_cache import EncoderCache


def feats(value: float) -> torch.Tensor:
    return torch.full((4, 8), float(value))  # 128 bytes of float32


def test_lru_within_budget() -> None:
    cache = EncoderCache(max_bytes=3 * 128)
    for i in range(3):
        cache.put(str(i), feats(i))
    assert cache.get("0") is not None  # 0 is now the most recent
    cache.put("3", feats(3))  # evicts 1, the least recently used
    assert cache.get("1") is None
    assert [k for k in ("0", "2", "3") if cache.get(k) is not None] == ["0", "2", "3"]
    assert cache.bytes == 3 * 128 and len(cache.entries) == 3
    assert (cache.hits, cache.misses) == (4, 1)
    found = cache.get("2")
    assert found is not None and torch.equal(found, feats(2))


def test_zero_budget_keeps_nothing() -> None:
    cache = EncoderCache(max_bytes=0)
    cache.put("a", feats(1))
    assert cache.get("a") is None and cache.bytes == 0
