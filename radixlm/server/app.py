"""The FastAPI application: routes, API key check, and errors in OpenAI's shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

import radixlm
from radixlm.server.auth import ApiKeyMiddleware, KeyTable, is_open
from radixlm.server.cache_events import cache_events_router
from radixlm.server.cache_routes import cache_router
from radixlm.server.errors import ApiError, error_body
from radixlm.server.http import json_response
from radixlm.server.native_api import native_router
from radixlm.server.openai_api import openai_router
from radixlm.server.openapi import openapi_document
from radixlm.server.tokenizer_manager import TokenizerManager

__all__ = ["ApiKeyMiddleware", "create_app", "is_open"]

logger = logging.getLogger(__name__)


# The methods a 405's Allow header may name.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route of app serves at the request's path (each one asked whether it
    would take the request with that method)."""
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.routes)
    ]


def create_app(
    manager: TokenizerManager,
    api_key: str | None = None,
    server_args: Mapping[str, Any] | None = None,
    *,
    keys: KeyTable | None = None,
) -> FastAPI:
    """The app over a manager whose engine starts with the app and stops with it. `keys` (an
    `--api-key-file`) or `api_key` (one admin) make every route but the open ones need a key."""
    if keys is None and api_key:
        keys = KeyTable.single_admin(api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            manager.shutdown()

    app = FastAPI(
        title="radixlm",
        version=radixlm.__version__,
        summary="SGLang's native API and OpenAI's, over a RadixAttention runtime",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.include_router(native_router(manager, server_args or {}))
    app.include_router(openai_router(manager))
    app.include_router(cache_events_router(manager))
    app.include_router(cache_router(manager, (server_args or {}).get("pin_quota_tokens")))
    app.openapi = partial(openapi_document, app, is_open if keys else None)  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Keeps Starlette's headers: a 405 must say which methods are allowed (RFC 9110), all of
        # them where several routes share the path (Starlette names the first one's only).
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.scope))}
        body = error_body(exc.status_code, str(exc.detail))
        return json_response(body, exc.status_code, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return json_response(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    if keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    return app
