"""Tenants and the cache: how a request's cache namespace is named and whose it is, and what a
tenant is shown of the cache (pins, the tree view). No torch: the server imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Joins a tenant and a request's own cache_salt into one salt; tenant names cannot contain it.
_SEP = "\x1f"
_TENANT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_tenant_name(name: object) -> str:
    """name, if it is a valid tenant name (1-64 of letters, digits and `_.@-`); else ValueError."""
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant names are 1-64 letters, digits or _.@- ; got {name!r}")
    return name


MAX_SALT_CHARS = 256
MAX_PIN_TTL_S = 86400.0
# Share of the KV pool one tenant may pin unless told otherwise: pinned slots are never evicted,
# so pins must leave most of the pool to running requests.
DEFAULT_PIN_QUOTA_FRACTION = 0.25


def default_pin_quota(pool_slots: int) -> int:
    """Tokens one tenant may pin in a pool of pool_slots by default."""
    return int(pool_slots * DEFAULT_PIN_QUOTA_FRACTION)


def check_cache_salt(salt: object) -> str | None:
    """salt, if it is None or a non-empty string of at most 256 characters; else ValueError."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT_CHARS or _SEP in salt:
        raise ValueError(
            f"cache_salt must be a non-empty string of at most {MAX_SALT_CHARS} characters "
            "(without the control character U+001F)"
        )
    return salt


def request_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The salt a request's K/V is cached under: a user's is its tenant's, narrowed by the
    request's own cache_salt, and never equal to a salt sent without a tenant (an admin's, or
    any on a server without keys), which is the cache_salt itself; None is shared."""
    if tenant is None:
        return cache_salt
    return f"{tenant}{_SEP}{cache_salt or ''}"


def salt_tenant(salt: str) -> str | None:
    """The tenant whose salt this is; None for a salt sent without a tenant."""
    tenant, sep, _ = salt.partition(_SEP)
    return tenant if sep else None


class PinQuotaExceeded(Exception):
    """A pin would take its tenant past its token quota (HTTP 429)."""


@dataclass(frozen=True, slots=True)
class PinInfo:
    """A pin as its owner sees it."""

    pin_id: str
    tenant: str
    tokens: int
    expires_in_s: float


@dataclass(frozen=True, slots=True)
class ViewNode:
    """One shown node; `more_*` count its descendants left out to bound the picture."""

    node_id: int
    parent_id: int  # -1: a child of the root
    tokens: int
    depth: int
    preview_ids: list[int]
    hits: int  # admissions whose match ended in this subtree
    last_access: int  # on the tree's logical clock
    lock_ref: int
    pinned: bool
    tier: str
    tenant: str | None  # None: the shared namespace
    more_nodes: int
    more_tokens: int


@dataclass(frozen=True, slots=True)
class TreeView:
    """What one reader may see of the tree, the biggest subtrees first, at most max_nodes."""

    nodes: list[ViewNode]
    clock: int  # the latest last_access in the tree
    visible_nodes: int
    visible_tokens: int


@dataclass(frozen=True, slots=True)
class CacheTree:
    """The answer to a ReadCacheTree call: the view and the pool's counters."""

    view: TreeView
    pins: list[PinInfo]
    public_prefix_tokens: list[int]  # token counts of the registered public prefixes
    pool_slots: int
    free_slots: int
    tree_tokens: int
    evicted_tokens: int
