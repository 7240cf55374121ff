"""API keys, tenants and roles: who is calling, and what they may do.

`--api-key KEY` is one admin; `--api-key-file FILE` maps keys to tenants and roles
(`{"KEY": {"tenant": "acme", "role": "user"}}`). Without keys everyone is an admin with no
tenant. A user's requests are cached under its tenant's salt; admins see and control all."""

from __future__ import annotations

import dataclasses
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from radixlm.engine.frontend import GenerateInput
from radixlm.server.errors import ApiError, error_body
from radixlm.server.http import json_response
from radixlm.tenancy import check_cache_salt, check_tenant_name, request_salt

ROLES = ("admin", "user")
# Probes and scrapers must work without the key (as in SGLang): /health, /health_generate,
# /metrics. So must the API's description (as in vLLM; SGLang asks for the key there): the page
# at /docs fetches /openapi.json without it, and the document holds no secret. So must the
# cache page, a static file whose script asks for a key before it reads anything.
OPEN_PREFIXES = ("/health", "/metrics", "/openapi.json", "/docs", "/cache/view")


def is_open(path: str) -> bool:
    """Whether a path is served without the API key."""
    return path.startswith(OPEN_PREFIXES)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a tenant name and a role."""

    tenant: str
    role: str

    @property
    def is_admin(self) -> bool:
        """Whether it may use the admin routes and see the whole cache."""
        return self.role == "admin"

    @property
    def salt_tenant(self) -> str | None:
        """The tenant whose salt its requests carry: a user's own; None for an admin, whose
        requests share the namespace they name (none, or their cache_salt)."""
        return None if self.is_admin else self.tenant


# Everyone, on a server without keys.
NO_AUTH = Principal("", "admin")


class KeyTable:
    """The keys a server accepts and whom each one names."""

    def __init__(self, keys: dict[str, Principal]) -> None:
        if not keys:
            raise ValueError("an API key table needs at least one key")
        self._headers = [(f"Bearer {k}".encode(), p) for k, p in keys.items()]

    @classmethod
    def single_admin(cls, key: str) -> KeyTable:
        """`--api-key`: one key, an admin."""
        return cls({key: Principal("admin", "admin")})

    @classmethod
    def from_file(cls, path: str | Path) -> KeyTable:
        """`--api-key-file`: a JSON object {key: {"tenant": name, "role": "user" | "admin"}}."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the API key file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the API key file must hold a JSON object")
        keys: dict[str, Principal] = {}
        for key, entry in data.items():
            if not key or not isinstance(entry, dict) or set(entry) - {"tenant", "role"}:
                raise ValueError(f"{path}: each key maps to {{'tenant': ..., 'role': ...}}")
            role = entry.get("role", "user")
            if role not in ROLES:
                raise ValueError(f"{path}: role must be one of {', '.join(ROLES)}, got {role!r}")
            keys[key] = Principal(check_tenant_name(entry.get("tenant")), role)
        return cls(keys)

    def lookup(self, header: bytes) -> Principal | None:
        """The principal an Authorization header names, or None (every key compared, in
        constant time each)."""
        found = None
        for expected, principal in self._headers:
            if hmac.compare_digest(header, expected):
                found = principal
        return found


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` names a known key; the caller's Principal goes
    into the request's state. A plain ASGI wrapper, so streams pass untouched."""

    def __init__(
        self, app: ASGIApp, keys: KeyTable | None = None, api_key: str | None = None
    ) -> None:
        self.app = app
        if keys is None:
            assert api_key, "give keys or api_key"
            keys = KeyTable.single_admin(api_key)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the header, then hand over to the app."""
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path: str = scope["path"]
            if not is_open(path):
                given = dict(scope["headers"]).get(b"authorization", b"")
                principal = self.keys.lookup(given)
                if principal is None:
                    body = error_body(
                        401, "missing or wrong API key (send Authorization: Bearer <key>)"
                    )
                    await json_response(body, 401)(scope, receive, send)
                    return
                scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    """Who sent request (NO_AUTH on a server without keys)."""
    principal = request.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else NO_AUTH


def require_admin(request: Request) -> Principal:
    """The caller, if an admin; else 403."""
    principal = principal_of(request)
    if not principal.is_admin:
        raise ApiError(403, "this route is for admin keys only")
    return principal


def salted(request: Request, inp: GenerateInput) -> GenerateInput:
    """inp with the salt the caller's request is cached under (its tenant's, for a user)."""
    return dataclasses.replace(inp, cache_salt=salt_for(request, inp.cache_salt))


def salt_for(request: Request, cache_salt: object) -> str | None:
    """The salt the caller's request with this cache_salt is cached under; 400 for a bad one."""
    try:
        return request_salt(principal_of(request).salt_tenant, check_cache_salt(cache_salt))
    except ValueError as e:
        raise ApiError(400, str(e), "cache_salt") from None
