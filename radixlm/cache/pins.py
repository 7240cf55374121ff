"""Pinned prefixes: tree paths that eviction skips until their TTL ends or their owner unpins."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from radixlm.cache.radix import RadixCache, TreeNode
from radixlm.tenancy import MAX_PIN_TTL_S, PinInfo, PinQuotaExceeded


@dataclass(slots=True, eq=False)
class _Pin:
    pin_id: str
    tenant: str
    node: TreeNode  # pinned through RadixCache.pin, so never evicted while the pin lasts
    expires_at: float

    def info(self, now: float) -> PinInfo:
        return PinInfo(self.pin_id, self.tenant, self.node.depth, max(self.expires_at - now, 0.0))


class PinTable:
    """The live pins over one RadixCache. Expiry is by the clock alone, so a pin whose owner
    went away still ends; the engine calls expire() before each step and control call."""

    def __init__(self, cache: RadixCache, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache, self.clock = cache, clock
        self._pins: dict[str, _Pin] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._pins)

    def tenant_tokens(self, tenant: str) -> int:
        """Tokens pinned by tenant (each pin counts its whole path)."""
        return sum(p.node.depth for p in self._pins.values() if p.tenant == tenant)

    def pin(
        self,
        ids: list[int],
        tenant: str,
        ttl_s: float,
        quota_tokens: int,
        *,
        salt: str | None = None,
        public_len: int = 0,
    ) -> PinInfo | None:
        """Pin the cached path of ids for ttl_s seconds; None (nothing pinned) unless all of ids
        is cached. PinQuotaExceeded past the tenant's quota_tokens."""
        if not 0 < ttl_s <= MAX_PIN_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_PIN_TTL_S:.0f}], got {ttl_s}")
        self.expire()
        used = self.tenant_tokens(tenant)
        if used + len(ids) > quota_tokens:  # checked first: a refused pin costs no prefill
            raise PinQuotaExceeded(
                f"pinning {len(ids)} tokens would take tenant {tenant!r} past its quota of "
                f"{quota_tokens} pinned tokens ({used} pinned now)"
            )
        match = self.cache.match_prefix(ids, salt=salt, public_len=public_len)
        if len(match.slots) < len(ids) or not ids:
            return None
        self.cache.pin(match.node)
        pin = _Pin(f"pin-{next(self._ids)}", tenant, match.node, self.clock() + ttl_s)
        self._pins[pin.pin_id] = pin
        return pin.info(self.clock())

    def unpin(self, pin_id: str, tenant: str | None = None) -> bool:
        """End a pin; tenant None may end anyone's. False if no such pin is tenant's."""
        pin = self._pins.get(pin_id)
        if pin is None or (tenant is not None and pin.tenant != tenant):
            return False
        del self._pins[pin_id]
        self.cache.unpin(pin.node)
        return True

    def expire(self) -> int:
        """End the pins whose TTL is over; returns how many ended."""
        if not self._pins:
            return 0
        now = self.clock()
        over = [p.pin_id for p in self._pins.values() if p.expires_at <= now]
        for pin_id in over:
            self.unpin(pin_id)
        return len(over)

    def clear(self) -> None:
        """End every pin (before a flush)."""
        for pin_id in list(self._pins):
            self.unpin(pin_id)

    def list(self, tenant: str | None = None) -> list[PinInfo]:
        """The live pins, all or tenant's."""
        now = self.clock()
        return [p.info(now) for p in self._pins.values() if tenant is None or p.tenant == tenant]
