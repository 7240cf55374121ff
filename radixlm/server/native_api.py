"""SGLang's native routes: /generate, health, model and server info, cache and abort control."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import fields
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

import radixlm
from radixlm.engine.client import RequestGroup
from radixlm.engine.frontend import GenerateInput
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
from radixlm.server.tokenizer_manager import TokenizerManager

HEALTH_GENERATE_TIMEOUT_S = 30.0

_GENERATE_FIELDS = frozenset(f.name for f in fields(GenerateInput))
# SGLang request fields its clients may send with an "off" value (bench_serving always sends
# lora_path: null); any other value is a feature radixlm does not have.
_INERT_FIELDS = frozenset(
    {"lora_path", "image_data", "return_hidden_states", "custom_logit_processor"}
)


def parse_generate(data: Mapping[str, Any]) -> GenerateInput:
    """Check a /generate body's fields and types (values are checked when tokenizing)."""
    for key, value in data.items():
        if key in _INERT_FIELDS:
            if value:
                raise ApiError(400, f"{key} is not supported", key)
        elif key not in _GENERATE_FIELDS:
            raise ApiError(400, f"unknown field {key!r}", key)
    for key in ("stream", "return_text_in_logprobs"):
        if not isinstance(data.get(key, False), bool):
            raise ApiError(400, f"{key} must be true or false", key)
    _check_type(data, "text", str)
    if not isinstance(data.get("input_ids", []), list):
        raise ApiError(
            400, "input_ids must be a list of token ids or a list of such lists", "input_ids"
        )
    _check_type(data, "return_logprob", bool)
    _check_type(data, "logprob_start_len", int)
    _check_type(data, "top_logprobs_num", int)
    _check_type(data, "rid", str)
    params = data.get("sampling_params")
    for p in params if isinstance(params, list) else [params]:
        if p is not None and not isinstance(p, dict):
            raise ApiError(
                400, "sampling_params must be an object or a list of objects", "sampling_params"
            )
    return GenerateInput(**{k: v for k, v in data.items() if k in _GENERATE_FIELDS})


def _check_type(data: Mapping[str, Any], key: str, kind: type) -> None:
    value = data.get(key)
    items = value if isinstance(value, list) else [value]
    for v in items:
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise ApiError(
                400, f"{key} must be a {kind.__name__} or a list of them, got {v!r}", key
            )


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
    router = APIRouter()

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        inp = parse_generate(await read_json(request))
        group = await submit(manager, inp)
        if inp.stream:
            return EventStream(_stream_events(group), lambda: manager.abort_unfinished(group))
        await wait_finished(request, manager, group)
        outs = [s.to_dict() for s in group.states]
        return json_response(outs if group.is_batch else outs[0])

    @router.get("/health")
    async def health() -> Response:
        manager.check_ready()
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate(request: Request) -> Response:
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

    @router.get("/model_info")
    @router.get("/get_model_info")
    async def model_info() -> Response:
        return json_response(
            {
                "model_path": manager.model_path,
                "tokenizer_path": manager.model_path,
                "is_generation": True,
                "served_model_name": manager.served_model_name,
                # radixlm's own: the --chat-template file in place of the model's, for clients
                # on this machine that render chat roles themselves (the frontend language).
                "chat_template": chat_template,
            }
        )

    @router.get("/server_info")
    @router.get("/get_server_info")
    async def server_info() -> Response:
        info: dict[str, Any] = {
            **manager.args.to_dict(),
            **server_args,
            "model_path": manager.model_path,
            "served_model_name": manager.served_model_name,
            "version": radixlm.__version__,
            **(dataclasses.asdict(manager.info) if manager.info is not None else {}),
        }
        stats: dict[str, Any] = {}
        if manager.ready:
            with contextlib.suppress(EngineUnavailable):  # it died just now
                stats = await manager.stats()
        # bench_serving reads internal_states[0]; radixlm has no speculative decoding.
        info["internal_states"] = [{**stats, "avg_spec_accept_length": None}]
        return json_response(info)

    @router.post("/flush_cache")
    async def flush_cache() -> Response:
        flushed = await manager.flush_cache()
        if not flushed:
            raise ApiError(
                400, f"cannot flush the cache while {manager.num_running} requests are running"
            )
        return PlainTextResponse("Cache flushed.\n")

    @router.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        data = await read_json(request)
        unknown = set(data) - {"rid", "abort_all"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
        if data.get("abort_all") is True:
            return json_response({"aborted": manager.abort_all()})
        rid = data.get("rid")
        if not isinstance(rid, str):
            raise ApiError(400, "rid must be a string (or set abort_all: true)", "rid")
        return json_response({"aborted": int(manager.abort(rid))})

    @router.get("/metrics")
    async def metrics() -> Response:
        stats = None
        if manager.ready:
            with contextlib.suppress(EngineUnavailable):  # it died just now
                stats = await manager.stats()
        return PlainTextResponse(
            manager.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @router.get("/internal/check_invariant")
    async def check_invariant() -> Response:
        """Check the KV slot invariant in the engine (tests and debugging)."""
        try:
            await manager.check_invariant()
        except AssertionError as e:
            raise ApiError(500, f"KV slot invariant broken: {e}") from None
        return json_response({"ok": True})

    return router
