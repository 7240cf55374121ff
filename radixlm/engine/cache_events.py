"""The engine's record of radix-tree changes, drained by the server for cache-aware routers."""

from __future__ import annotations

from radixlm.cache import RadixCache
from radixlm.core.messages import CacheEvent, CacheEventBatch

# Token ids the record holds between drains; past it the record is dropped, and the next drain
# answers with a snapshot instead (a reader that stopped draining costs bounded memory).
MAX_RECORDED_TOKENS = 1 << 22


class CacheEventLog:
    """Records a RadixCache's inserts and removals once the first drain asks for them."""

    def __init__(self, cache: RadixCache, max_tokens: int = MAX_RECORDED_TOKENS) -> None:
        self.cache = cache
        self.max_tokens = max_tokens
        self._events: list[CacheEvent] = []
        self._tokens = 0
        self._overflowed = False

    def _record(self, kind: str, ids: list[int], depth: int) -> None:
        if self._overflowed:
            return
        self._tokens += len(ids)
        if self._tokens > self.max_tokens:
            self._events.clear()
            self._overflowed = True
            return
        self._events.append((kind, ids, depth))

    def drain(self, snapshot: bool = False) -> CacheEventBatch:
        """The changes since the last drain, or the whole tree when asked, on the first drain,
        or after an overflow."""
        tree: list[tuple[int, list[int]]] | None = None
        if snapshot or self._overflowed or self.cache.on_change is None:
            self.cache.on_change = self._record
            tree = self.cache.snapshot()
            self._events = []
        batch = CacheEventBatch(tree, self._events)
        self._events, self._tokens, self._overflowed = [], 0, False
        return batch
