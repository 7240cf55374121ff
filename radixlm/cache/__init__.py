"""KV memory: the slot pool, its allocator, and the radix prefix cache over them."""

from __future__ import annotations

from radixlm.cache.pool import KVPool, SlotAllocator
from radixlm.cache.radix import MatchResult, RadixCache, TreeNode

__all__ = ["KVPool", "MatchResult", "RadixCache", "SlotAllocator", "TreeNode"]
