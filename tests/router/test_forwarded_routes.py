"""The router's plain-ASGI forwarded routes, with no worker to forward to (no servers)."""

from __future__ import annotations

import asyncio

import httpx

from radixlm.router.app import create_router_app
from radixlm.router.args import RouterArgs


def _calls(*requests: tuple[str, str, bytes]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        app = create_router_app(RouterArgs(api_key="k"))
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            return [
                await client.request(method, path, content=body, headers=headers)
                for method, path, body in requests
            ]

    return asyncio.run(main())


def test_wrong_method_no_worker_and_other_routes() -> None:
    wrong, no_worker, chat, models, other = _calls(
        ("GET", "/generate", b""),
        ("POST", "/generate", b'{"text": "hi", "session_id": "s"}'),
        ("POST", "/v1/chat/completions", b"not json"),
        ("GET", "/v1/models", b""),
        ("GET", "/no_such_route", b""),
    )
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    assert wrong.json()["error"]["code"] == 405
    for r in (no_worker, chat, models):  # nothing healthy to send them to
        assert r.status_code == 503, r.text
        assert "no healthy worker" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "2"
    assert other.status_code == 404  # FastAPI's routes answer the rest


def test_the_api_key_guards_the_forwarded_routes() -> None:
    async def main() -> int:
        transport = httpx.ASGITransport(app=create_router_app(RouterArgs(api_key="k")))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            return (await client.post("/generate", content=b"{}")).status_code

    assert asyncio.run(main()) == 401
