"""The cache routes: public prefixes, pins, the tree as JSON (GET /cache) and as a live page
(GET /cache/view). Users see and pin within their tenant; admins see and control all."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from radixlm.core.messages import AddPublicPrefix, PinPrefix, ReadCacheTree, Unpin
from radixlm.engine.frontend import GenerateInput, prefix_ids
from radixlm.server.auth import principal_of, require_admin, salt_for
from radixlm.server.errors import ApiError
from radixlm.server.http import json_response, read_json, submit, wait_finished
from radixlm.server.native_protocol import (
    CacheTreeOutput,
    PinInput,
    PinOutput,
    PublicPrefixInput,
    PublicPrefixOutput,
    UnpinOutput,
)
from radixlm.server.openapi import error_responses, json_body
from radixlm.server.tokenizer_manager import TokenizerManager
from radixlm.tenancy import (
    MAX_PIN_TTL_S,
    CacheTree,
    PinInfo,
    PinQuotaExceeded,
    default_pin_quota,
)

DEFAULT_VIEW_NODES = 500
MAX_VIEW_NODES = 5000
DEFAULT_PIN_TTL_S = 300.0
_MAX_NODES_PARAM = {
    "parameters": [
        {
            "name": "max_nodes",
            "in": "query",
            "required": False,
            "description": "at most this many nodes (the biggest subtrees first)",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_VIEW_NODES},
        }
    ]
}
_PIN_ID_PARAM = {
    "parameters": [{"name": "pin_id", "in": "path", "required": True, "schema": {"type": "string"}}]
}


def cache_router(manager: TokenizerManager, pin_quota_tokens: int | None = None) -> APIRouter:
    """The cache routes over one tokenizer manager; pin_quota_tokens per tenant (None: a
    quarter of the KV pool)."""
    router = APIRouter(tags=["cache"])

    def prefix_of(data: dict[str, Any], allowed: set[str]) -> list[int]:
        unknown = set(data) - allowed
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
        manager.check_ready()
        assert manager.tokenizer is not None and manager.info is not None
        try:
            return prefix_ids(
                manager.tokenizer, data.get("text"), data.get("input_ids"), manager.info.vocab_size
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    @router.post(
        "/cache/public_prefix",
        response_model=PublicPrefixOutput,
        responses=error_responses(400, 403, 503),
        openapi_extra=json_body(PublicPrefixInput),
    )
    async def add_public_prefix(request: Request) -> Response:
        """Register a prefix that every tenant shares (admins only); a salted prompt starting
        with it shares that part and is isolated after it."""
        require_admin(request)
        ids = prefix_of(await read_json(request), {"text", "input_ids"})
        new = await manager.control(AddPublicPrefix(ids))
        return json_response({"input_ids": ids, "new": bool(new)})

    @router.post(
        "/cache/pin",
        response_model=PinOutput,
        responses=error_responses(400, 429, 503),
        openapi_extra=json_body(PinInput),
    )
    async def pin(request: Request) -> Response:
        """Prefill (if needed) and pin a prefix: eviction skips it until ttl_s passes or it is
        deleted. Pins count against the tenant's token quota (429 past it)."""
        data = await read_json(request)
        ids = prefix_of(data, {"text", "input_ids", "ttl_s", "cache_salt"})
        ttl = data.get("ttl_s", DEFAULT_PIN_TTL_S)
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not 0 < ttl <= MAX_PIN_TTL_S
        ):
            raise ApiError(400, f"ttl_s must be a number in (0, {MAX_PIN_TTL_S:.0f}]", "ttl_s")
        salt = salt_for(request, data.get("cache_salt"))
        assert manager.info is not None
        quota = pin_quota_tokens
        if quota is None:
            quota = default_pin_quota(manager.info.max_total_num_tokens)
        call = PinPrefix(ids, salt, principal_of(request).tenant, float(ttl), quota)
        try:
            answer = await manager.control(call)
            if answer is None:  # not all cached: prefill it under the same salt, then pin
                inp = GenerateInput(
                    input_ids=ids, sampling_params={"max_new_tokens": 0}, cache_salt=salt
                )
                group = await submit(manager, inp)
                await wait_finished(request, manager, group)
                answer = await manager.control(call)
        except PinQuotaExceeded as e:
            raise ApiError(429, str(e)) from None
        if not isinstance(answer, PinInfo):
            raise ApiError(503, "the prefix was evicted before it could be pinned; try again")
        return json_response(dataclasses.asdict(answer))

    @router.delete(
        "/cache/pin/{pin_id}",
        response_model=UnpinOutput,
        responses=error_responses(404, 503),
        openapi_extra=_PIN_ID_PARAM,
    )
    async def unpin(request: Request) -> Response:
        """End a pin now (a user may end its own tenant's pins only)."""
        pin_id: str = request.path_params["pin_id"]  # read here: FastAPI's 422 has another shape
        principal = principal_of(request)
        owner = None if principal.is_admin else principal.tenant
        if not await manager.control(Unpin(pin_id, owner)):
            raise ApiError(404, f"no pin {pin_id!r}")
        return json_response({"unpinned": pin_id})

    @router.get(
        "/cache",
        response_model=CacheTreeOutput,
        responses=error_responses(400, 503),
        openapi_extra=_MAX_NODES_PARAM,
    )
    async def cache_tree(request: Request) -> Response:
        """The radix tree as the caller may see it: an admin all of it and the pool's counters,
        a user its tenant's nodes and the public ones."""
        raw = request.query_params.get("max_nodes", str(DEFAULT_VIEW_NODES))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_VIEW_NODES:
            raise ApiError(
                400, f"max_nodes must be an integer in [1, {MAX_VIEW_NODES}]", "max_nodes"
            )
        principal = principal_of(request)
        tenant = None if principal.is_admin else principal.tenant
        tree = await manager.control(ReadCacheTree(tenant, int(raw)))
        assert isinstance(tree, CacheTree)
        return json_response(render_tree(manager, tree, tenant))

    page = _page()

    @router.get("/cache/view", response_class=HTMLResponse)
    async def cache_view() -> Response:
        """A live picture of the radix tree (an icicle), with hit rate, evictions and pool usage
        over time; the page asks for an API key and reads GET /cache with it."""
        return HTMLResponse(page)

    return router


def render_tree(manager: TokenizerManager, tree: CacheTree, tenant: str | None) -> dict[str, Any]:
    """GET /cache's answer: node texts decoded, and counters for admins only (a user learns
    nothing of other tenants' traffic)."""
    tokenizer = manager.tokenizer
    assert tokenizer is not None
    nodes = [
        {
            "id": n.node_id,
            "parent": n.parent_id,
            "tokens": n.tokens,
            "depth": n.depth,
            "text": tokenizer.decode(n.preview_ids),
            "hits": n.hits,
            "last_access": n.last_access,
            "lock_ref": n.lock_ref,
            "pinned": n.pinned,
            "tier": n.tier,
            "tenant": n.tenant,
            "more_nodes": n.more_nodes,
            "more_tokens": n.more_tokens,
        }
        for n in tree.view.nodes
    ]
    stats = None
    if tenant is None:
        m = manager.metrics
        stats = {
            "pool_slots": tree.pool_slots,
            "free_slots": tree.free_slots,
            "tree_tokens": tree.tree_tokens,
            "evicted_tokens": tree.evicted_tokens,
            "cache_hit_rate": m.cache_hit_rate,
            "prompt_tokens": m.prompt_tokens,
            "cached_tokens": m.cached_tokens,
        }
    return {
        "tenant": tenant,
        "clock": tree.view.clock,
        "visible_nodes": tree.view.visible_nodes,
        "visible_tokens": tree.view.visible_tokens,
        "nodes": nodes,
        "pins": [dataclasses.asdict(p) for p in tree.pins],
        "public_prefix_tokens": tree.public_prefix_tokens,
        "stats": stats,
    }


def _page() -> str:
    """The page, its style and script inlined (shipped in radixlm/server/static; no CDN)."""
    static = resources.files("radixlm.server") / "static"
    html = (static / "cache_view.html").read_text()
    css = (static / "cache_view.css").read_text()
    js = (static / "cache_view.js").read_text()
    return html.replace("/*STYLE*/", css).replace("/*SCRIPT*/", js)
