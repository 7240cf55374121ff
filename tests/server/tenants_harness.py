"""A tiny-model server with tenant keys, shared by the tenant and cache-page tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
from server_harness import ServerProcess

KEYS = {
    "admin-key": {"tenant": "ops", "role": "admin"},
    "acme-key": {"tenant": "acme", "role": "user"},
    "beta-key": {"tenant": "beta", "role": "user"},
}
PIN_QUOTA = 64


def start_tenant_server(
    start: Callable[..., ServerProcess], folder: Path, *flags: str
) -> ServerProcess:
    """A server whose keys are KEYS (started through start_tiny_server's `start`)."""
    key_file = folder / "keys.json"
    key_file.write_text(json.dumps(KEYS))
    return start(
        "--api-key-file", str(key_file), "--pin-quota-tokens", str(PIN_QUOTA), *flags, api_key=None
    )


def client(server: ServerProcess, key: str | None) -> httpx.Client:
    """A client sending key (none if None)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)
