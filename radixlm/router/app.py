"""The router's HTTP app: the workers' APIs forwarded, control routes fanned out, /workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

import radixlm
from radixlm.router.args import RouterArgs
from radixlm.router.metrics import RouterMetrics, merge
from radixlm.router.policy import make_policy
from radixlm.router.prompts import PromptReader
from radixlm.router.proxy import Forwarder
from radixlm.router.replicas import ReplicaSet
from radixlm.router.workers import WorkerPool
from radixlm.server.app import ApiKeyMiddleware
from radixlm.server.errors import ApiError, EngineUnavailable, error_body
from radixlm.server.http import json_response, read_json
from radixlm.server.native_api import CLEAR_STORAGE_ROUTES, STORAGE_CLEARED

logger = logging.getLogger(__name__)

# Connections for health checks, cache mirrors and control calls (requests go over the
# Forwarder's own): a bounded wait to connect, none for an answer.
_LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)
FANOUT_TIMEOUT_S = 60.0


class Router:
    """The workers, the policy, and the HTTP clients to reach them."""

    def __init__(self, args: RouterArgs) -> None:
        self.args = args
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.AsyncClient(headers=headers, limits=_LIMITS, timeout=_TIMEOUT)
        self.pool = WorkerPool(self.client, args.health_check_interval_s)
        self.metrics = RouterMetrics()
        self.forwarder = Forwarder(headers, self.pool, make_policy(args), self.metrics)
        self.prompts = PromptReader(self.client, self.pool, args.tokenizer_path)

    async def start(self) -> None:
        """Start health checks, cache mirrors and the tokenizer's loading."""
        await self.forwarder.start()
        self.pool.start(self.args.worker_urls)
        self.prompts.start()

    async def close(self) -> None:
        """Stop the background tasks and close the connections."""
        await self.prompts.close()
        await self.pool.close()
        await self.forwarder.close()
        await self.client.aclose()

    async def fan_out(self, method: str, path: str, body: bytes = b"") -> list[httpx.Response]:
        """The same call to every healthy worker; the answers of those that could be reached."""
        urls = [w.url for w in self.pool.healthy()]
        if not urls:
            raise EngineUnavailable("no healthy worker", retry_after_s=2)

        async def call(url: str) -> httpx.Response | None:
            try:
                return await self.client.request(
                    method, url + path, content=body, timeout=FANOUT_TIMEOUT_S
                )
            except httpx.HTTPError as e:
                logger.warning("%s %s%s failed: %s", method, url, path, e)
                return None

        answers = await asyncio.gather(*(call(u) for u in urls))
        return [a for a in answers if a is not None]


def _first_failure(answers: list[httpx.Response]) -> Response | None:
    """The first worker answer of a fan-out that is not a 200, passed on as it came."""
    bad = next((a for a in answers if a.status_code != 200), None)
    if bad is None:
        return None
    return Response(bad.content, bad.status_code, {"content-type": "application/json"})


# The routes forwarded to the worker the policy picks, and the kind of prompt each carries.
ROUTED = {"/generate": "generate", "/v1/completions": "completion", "/v1/chat/completions": "chat"}
# The routes any worker answers.
ANY_WORKER = frozenset(("/v1/models", "/model_info", "/get_model_info", "/health_generate"))
_KEY_HEADERS = (b"x-routing-key", b"x-session-id")


class ForwardedRoutes:
    """The forwarded routes as a plain ASGI app in front of the others' (`app`): no routing,
    body validation or middleware on the hot path; the worker validates the body."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward a request of a forwarded route; hand anything else to `app`."""
        path: str = scope.get("path", "")
        kind = ROUTED.get(path) if scope["type"] == "http" else None
        if kind is None and (scope["type"] != "http" or path not in ANY_WORKER):
            await self.app(scope, receive, send)
            return
        forwarder = self.router.forwarder
        method = "POST" if kind else "GET"
        response: ASGIApp
        try:
            if scope["method"] != method:
                body = error_body(405, "Method Not Allowed")
                response = json_response(body, 405, {"Allow": method})
            elif kind is None:
                response = await forwarder.forward(receive, "GET", path, b"", [], None, False)
            else:
                response = await self._forward(scope, receive, kind)
        except ApiError as e:
            response = json_response(e.body(), e.status, e.headers())
        except Exception as e:
            logger.exception("unexpected error on %s", scope["path"])
            response = json_response(
                error_body(500, f"internal error: {type(e).__name__}: {e}"), 500
            )
        await response(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, kind: str) -> ASGIApp:
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body"):
            chunks = [body]
            while message.get("more_body"):
                message = await receive()
                chunks.append(message.get("body", b""))
            body = b"".join(chunks)
        forwarder, path = self.router.forwarder, scope["path"]
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):  # the worker answers with the error
            return await forwarder.forward(receive, "POST", path, body, [], None, False)
        key = _key(scope, data)
        if "session_id" in data:  # the router's own field: workers do not know it
            del data["session_id"]
            body = orjson.dumps(data)
        ids = await self.router.prompts.ids(kind, data)
        stream = data.get("stream") is True
        return await forwarder.forward(receive, "POST", path, body, ids, key, stream)


def _key(scope: Scope, data: Mapping[str, Any]) -> str | None:
    """The routing key of consistent_hash: a header, else the body's session_id or user."""
    headers = dict(scope["headers"])
    for header in _KEY_HEADERS:
        if value := headers.get(header):
            return str(value.decode("latin-1"))
    for field in ("session_id", "user"):
        value = data.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def create_router_app(args: RouterArgs, replicas: ReplicaSet | None = None) -> ASGIApp:
    """The router's app; its workers are followed from the app's start to its end. Replicas
    the router runs itself are restarted when they die while it serves, and stopped at its end."""
    router = Router(args)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        watch = asyncio.create_task(replicas.watch(router.pool)) if replicas else None
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await router.close()
            if replicas is not None:
                await asyncio.to_thread(replicas.stop)

    app = FastAPI(
        title="radixlm router", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )

    @app.get("/health")
    async def health() -> Response:
        if not router.pool.healthy():
            raise EngineUnavailable("no healthy worker", retry_after_s=2)
        return Response(status_code=200)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        answers = await router.fan_out("POST", "/flush_cache")
        if (failed := _first_failure(answers)) is not None:
            return failed
        return PlainTextResponse(f"Cache flushed on {len(answers)} workers.\n")

    async def clear_hicache_storage(request: Request) -> Response:
        answers = await router.fan_out("POST", request.url.path)
        if (failed := _first_failure(answers)) is not None:
            return failed
        return json_response(STORAGE_CLEARED)

    for method, path in CLEAR_STORAGE_ROUTES:
        app.add_api_route(path, clear_hicache_storage, methods=[method])

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        answers = await router.fan_out("POST", "/abort_request", await request.body())
        if (failed := _first_failure(answers)) is not None:
            return failed
        aborted = sum(int(a.json().get("aborted", 0)) for a in answers)
        return json_response({"aborted": aborted})

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        answers = await router.fan_out("GET", "/server_info")
        infos = []
        for a in answers:
            with contextlib.suppress(ValueError):  # a worker that is not radixlm's
                infos.append(a.json() if a.status_code == 200 else {})
        infos = [i for i in infos if isinstance(i, dict) and i]
        info: dict[str, Any] = dict(infos[0]) if infos else {}
        info["internal_states"] = [s for i in infos for s in i.get("internal_states", [])]
        info.update(
            {
                "version": radixlm.__version__,
                "router": {
                    **args.public(),
                    "tokenizer_ready": router.prompts.tokenizer is not None,
                },
                "workers": [w.to_dict() for w in router.pool.workers.values()],
            }
        )
        return json_response(info)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = router.metrics.render(list(router.pool.workers.values()))
        with contextlib.suppress(ApiError):
            answers = await router.fan_out("GET", "/metrics")
            texts = [(str(a.request.url).removesuffix("/metrics"), a.text) for a in answers]
            text += "\n".join(merge(texts)) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/workers")
    async def list_workers() -> Response:
        return json_response([w.to_dict() for w in router.pool.workers.values()])

    @app.post("/workers")
    async def add_worker(request: Request) -> Response:
        url = (await read_json(request)).get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ApiError(400, "url must be an http(s) URL", "url")
        worker = router.pool.add(url)
        await router.pool.check(worker)
        return json_response(worker.to_dict())

    @app.delete("/workers")
    async def remove_worker(request: Request) -> Response:
        url = (await read_json(request)).get("url")
        if not isinstance(url, str) or not router.pool.remove(url):
            raise ApiError(404, f"no worker {url!r}", "url")
        return json_response({"removed": url})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return json_response(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    routes = ForwardedRoutes(app, router)
    return ApiKeyMiddleware(routes, api_key=args.api_key) if args.api_key else routes
