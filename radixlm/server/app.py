"""The FastAPI application: routes, API key check, and errors in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

import radixlm
from radixlm.server.cache_events import cache_events_router
from radixlm.server.errors import ApiError, error_body
from radixlm.server.http import json_response
from radixlm.server.native_api import native_router
from radixlm.server.openai_api import openai_router
from radixlm.server.openapi import openapi_document
from radixlm.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

# Probes and scrapers must work without the key (as in SGLang): /health, /health_generate,
# /metrics. So must the API's description (as in vLLM; SGLang asks for the key there): the page
# at /docs fetches /openapi.json without it, and the document holds no secret.
OPEN_PREFIXES = ("/health", "/metrics", "/openapi.json", "/docs")


def is_open(path: str) -> bool:
    """Whether a path is served without the API key."""
    return path.startswith(OPEN_PREFIXES)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`; a plain ASGI wrapper, so streams pass untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the header, then hand over to the app."""
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path: str = scope["path"]
            if not is_open(path):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    body = error_body(
                        401, "missing or wrong API key (send Authorization: Bearer <key>)"
                    )
                    await json_response(body, 401)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(
    manager: TokenizerManager,
    api_key: str | None = None,
    server_args: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The app over a manager whose engine starts with the app and stops with it."""

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
    app.openapi = partial(openapi_document, app, is_open if api_key else None)  # type: ignore[method-assign]
    app.include_router(cache_events_router(manager))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Keeps Starlette's headers: a 405 must say which methods are allowed (RFC 9110).
        body = error_body(exc.status_code, str(exc.detail))
        return json_response(body, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return json_response(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
