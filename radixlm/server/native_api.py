"""SGLang's native routes: /generate, health, model and server info, cache and abort control."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

import radixlm
from radixlm.engine.client import RequestGroup
from radixlm.engine.frontend import GenerateInput
from radixlm.server.auth import require_admin, salted
from radixlm.server.errors import ApiError, EngineUnavailable, RequestFailed
from radixlm.server.http import (
    DONE,
    EventStream,
    json_response,
    read_json,
    sse,
    sse_error,
    submit,
    wait_finished,
)
from radixlm.server.metrics import accept_length
from radixlm.server.native_protocol import (
    AbortReqInput,
    AbortResult,
    GenerateChunk,
    GenerateOutput,
    GenerateReqInput,
    InvariantResult,
    ModelInfo,
    ServerInfo,
    parse_generate,
)
from radixlm.server.openapi import error_responses, event_stream, json_body
from radixlm.server.tokenizer_manager import TokenizerManager

HEALTH_GENERATE_TIMEOUT_S = 30.0

# SGLang's routes that delete its storage tier's K/V (the newer one, and the deprecated one).
CLEAR_STORAGE_ROUTES = (
    ("POST", "/hicache/storage-backend/clear"),
    ("GET", "/clear_hicache_storage_backend"),
    ("POST", "/clear_hicache_storage_backend"),
)
STORAGE_CLEARED = "Hierarchical cache storage backend cleared."


async def _stream_events(group: RequestGroup) -> AsyncGenerator[bytes, None]:
    """Cumulative events (SGLang's client slices off the text it has seen), then [DONE]."""
    try:
        while not group.finished:
            for i in await group.updates():
                out = group.states[i].to_dict()
                yield sse({"index": i, **out} if group.is_batch else out)
    except RequestFailed as e:
        yield sse_error(e.status, str(e))
    yield DONE


def native_router(manager: TokenizerManager, server_args: Mapping[str, Any]) -> APIRouter:
    """The native routes over one tokenizer manager."""
    router = APIRouter(tags=["native"])

    @router.post(
        "/generate",
        response_model=GenerateOutput | list[GenerateOutput],
        responses=error_responses(400, 503),
        openapi_extra={**json_body(GenerateReqInput), **event_stream(GenerateChunk)},
    )
    async def generate(request: Request) -> Response:
        """Generate from text or token ids; a list is a batch (SGLang's native API)."""
        inp = salted(request, parse_generate(await read_json(request)))
        group = await submit(manager, inp)
        if inp.stream:
            return EventStream(_stream_events(group), lambda: manager.abort_unfinished(group))
        await wait_finished(request, manager, group)
        outs = [s.to_dict() for s in group.states]
        return json_response(outs if group.is_batch else outs[0])

    @router.get(
        "/health",
        response_class=Response,
        response_description="Serving",
        responses=error_responses(503),
    )
    async def health() -> Response:
        """Whether the server is serving (503 while the engine starts, or once it is gone)."""
        manager.check_ready()
        return Response(status_code=200)

    @router.get(
        "/health_generate",
        response_class=Response,
        response_description="The engine generated a token",
        responses=error_responses(503),
    )
    async def health_generate(request: Request) -> Response:
        """Generate one token, to check that the engine works end to end."""
        inp = GenerateInput(
            text="ping",
            sampling_params={"max_new_tokens": 1, "temperature": 0},
            rid=f"health-{uuid.uuid4().hex}",
        )
        group = await submit(manager, inp)
        try:
            await asyncio.wait_for(
                wait_finished(request, manager, group), HEALTH_GENERATE_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            raise EngineUnavailable(
                "the engine did not answer a one-token generation in time"
            ) from None
        return Response(status_code=200)

    chat_template = manager.args.chat_template and os.path.abspath(manager.args.chat_template)

    @router.get("/model_info", response_model=ModelInfo)
    @router.get("/get_model_info", response_model=ModelInfo)
    async def model_info() -> Response:
        """The served model (`/get_model_info`: SGLang's older name)."""
        return json_response(
            {
                "model_path": manager.model_path,
                "tokenizer_path": manager.model_path,
                "is_generation": True,
                "served_model_name": manager.served_model_name,
                # radixlm's own: the --chat-template file in place of the model's, for clients
                # on this machine that render chat roles themselves (the frontend language).
                "chat_template": chat_template,
                "image_token": manager.info.image.token_text
                if manager.info is not None and manager.info.image is not None
                else None,
            }
        )

    @router.get("/server_info", response_model=ServerInfo)
    @router.get("/get_server_info", response_model=ServerInfo)
    async def server_info() -> Response:
        """The server's arguments and the engine's counters (`/get_server_info`: the older name)."""
        info: dict[str, Any] = {
            **manager.args.to_dict(),
            **server_args,
            "model_path": manager.model_path,
            "served_model_name": manager.served_model_name,
            "version": radixlm.__version__,
            "server_gc_frozen_objects": manager.gc_frozen_objects,
            **(dataclasses.asdict(manager.info) if manager.info is not None else {}),
        }
        stats: dict[str, Any] = {}
        if manager.ready:
            with contextlib.suppress(EngineUnavailable):  # it died just now
                stats = await manager.stats()
        # bench_serving reads internal_states[0].
        accept = accept_length(stats.get("spec", {})) if stats.get("spec") else None
        info["internal_states"] = [{**stats, "avg_spec_accept_length": accept}]
        return json_response(info)

    @router.post(
        "/flush_cache",
        response_class=PlainTextResponse,
        responses=error_responses(400, 403, 503),
    )
    async def flush_cache(request: Request) -> Response:
        """Empty the radix cache and end every pin (admins only); refused (400) while requests
        run. What the disk KV tier holds stays (`/clear_hicache_storage_backend` deletes it)."""
        require_admin(request)
        flushed = await manager.flush_cache()
        if not flushed:
            raise ApiError(
                400, f"cannot flush the cache while {manager.num_running} requests are running"
            )
        return PlainTextResponse("Cache flushed.\n")

    async def clear_hicache_storage(request: Request) -> Response:
        """Delete every block of the disk KV tier (admins only; SGLang's HiCache storage clear):
        later requests find only what the pool holds. 400 without a tier (`--kv-cache-dir`)."""
        require_admin(request)
        if await manager.clear_hicache_storage() is None:
            raise ApiError(400, "this server has no disk KV tier (--kv-cache-dir)")
        return json_response(STORAGE_CLEARED)

    for method, path in CLEAR_STORAGE_ROUTES:
        router.add_api_route(
            path,
            clear_hicache_storage,
            methods=[method],
            operation_id=f"clear_hicache_storage_{method.lower()}{path.replace('/', '_')}",
            response_model=str,
            responses=error_responses(400, 403, 503),
        )

    @router.post(
        "/abort_request",
        response_model=AbortResult,
        responses=error_responses(400),
        openapi_extra=json_body(AbortReqInput),
    )
    async def abort_request(request: Request) -> Response:
        """Abort a running request by its rid, or all of them."""
        data = await read_json(request)
        unknown = set(data) - {"rid", "abort_all"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
        rid, abort_all = data.get("rid"), data.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise ApiError(400, "abort_all must be true or false", "abort_all")
        if not isinstance(rid, (str, type(None))):
            raise ApiError(400, "rid must be a string", "rid")
        if abort_all:
            return json_response({"aborted": manager.abort_all()})
        if rid is None:
            raise ApiError(400, "rid must be a string (or set abort_all: true)", "rid")
        return json_response({"aborted": int(manager.abort(rid))})

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics, with SGLang's names (`sglang:` prefix)."""
        stats = None
        if manager.ready:
            with contextlib.suppress(EngineUnavailable):  # it died just now
                stats = await manager.stats()
        return PlainTextResponse(
            manager.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @router.get(
        "/internal/check_invariant",
        response_model=InvariantResult,
        responses=error_responses(403, 500, 503),
    )
    async def check_invariant(request: Request) -> Response:
        """Check the KV slot invariant in the engine (admins only; tests and debugging)."""
        require_admin(request)
        try:
            await manager.check_invariant()
        except AssertionError as e:
            raise ApiError(500, f"KV slot invariant broken: {e}") from None
        return json_response({"ok": True})

    return router
