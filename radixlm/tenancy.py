"""Tenants and cache salts: how a request's cache namespace is named, and whose it is."""

from __future__ import annotations

import re

# Joins a tenant and a request's own cache_salt into one salt; tenant names cannot contain it.
_SEP = "\x1f"
_TENANT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_tenant_name(name: str) -> str:
    """name, if it is a valid tenant name (1-64 of letters, digits and `_.@-`); else ValueError."""
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant names are 1-64 letters, digits or _.@- ; got {name!r}")
    return name


def request_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The salt a request's K/V is cached under: its tenant's (a user's requests never share
    K/V with another tenant's), narrowed by the request's own cache_salt; None is shared."""
    if tenant is None:
        return cache_salt
    return tenant if cache_salt is None else f"{tenant}{_SEP}{cache_salt}"


def salt_tenant(salt: str) -> str:
    """The tenant a salt belongs to (for a salt sent without tenants, the salt's first part)."""
    return salt.split(_SEP, 1)[0]
