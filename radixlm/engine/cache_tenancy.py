"""The engine's tenant-facing cache state: public prefixes, pins, and the tree view calls."""

from __future__ import annotations

from radixlm.cache import RadixCache
from radixlm.cache.pins import PinTable
from radixlm.cache.public import PublicPrefixes
from radixlm.cache.view import tree_view
from radixlm.core.messages import AddPublicPrefix, ControlCall, PinPrefix, ReadCacheTree, Unpin
from radixlm.tenancy import CacheTree

MAX_VIEW_NODES = 5000


class CacheTenancy:
    """Answers the cache's tenant control calls over one RadixCache."""

    def __init__(self, cache: RadixCache) -> None:
        self.cache = cache
        self.public = PublicPrefixes()
        self.pins = PinTable(cache)

    def control(self, call: ControlCall) -> object:
        """AddPublicPrefix, PinPrefix, Unpin or ReadCacheTree (see radixlm.core.messages)."""
        if isinstance(call, AddPublicPrefix):
            return self.public.add(call.input_ids)
        if isinstance(call, PinPrefix):
            salt = call.cache_salt
            return self.pins.pin(
                list(call.input_ids),
                call.tenant,
                call.ttl_s,
                call.quota_tokens,
                salt=salt,
                public_len=self.public.boundary(call.input_ids) if salt is not None else 0,
            )
        if isinstance(call, Unpin):
            return self.pins.unpin(call.pin_id, call.tenant)
        if isinstance(call, ReadCacheTree):
            return self.read(call.tenant, call.max_nodes)
        raise TypeError(f"unknown control call {type(call).__name__}")

    def read(self, tenant: str | None, max_nodes: int) -> CacheTree:
        """The tree as tenant sees it, and the pool's counters."""
        if not 1 <= max_nodes <= MAX_VIEW_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_VIEW_NODES}], got {max_nodes}")
        alloc = self.cache.allocator
        return CacheTree(
            view=tree_view(self.cache, self.public, tenant, max_nodes),
            pins=self.pins.list(tenant),
            public_prefix_tokens=[len(p) for p in self.public.items()],
            pool_slots=alloc.num_slots,
            free_slots=alloc.num_free,
            tree_tokens=self.cache.total_size(),
            evicted_tokens=self.cache.evicted_tokens,
        )
