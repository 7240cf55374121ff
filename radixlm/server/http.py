"""HTTP plumbing shared by the native and OpenAI routes: bodies, submission, SSE, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from radixlm.engine.client import RequestGroup
from radixlm.engine.frontend import GenerateInput
from radixlm.server.errors import ApiError, error_body
from radixlm.server.tokenizer_manager import TokenizerManager

DONE = b"data: [DONE]\n\n"


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response serialized with orjson (NaN and inf become null)."""
    return Response(
        orjson.dumps(content), status_code=status, headers=headers, media_type="application/json"
    )


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_error(status: int, message: str) -> bytes:
    """The event that reports an error in the middle of a stream."""
    return sse(error_body(status, message))


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is not one."""
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


async def submit(
    manager: TokenizerManager, inp: GenerateInput, rename: Callable[[str], str] = str
) -> RequestGroup:
    """Send a request to the engine; a validation error is 400 (an engine that is down raises
    EngineUnavailable, itself an ApiError: 503)."""
    try:
        return await manager.submit(inp)
    except ValueError as e:
        raise ApiError(400, rename(str(e))) from None


async def _await_disconnect(receive: Receive) -> None:
    # Once the body has been read, the server's next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_finished(request: Request, manager: TokenizerManager, group: RequestGroup) -> None:
    """Wait for a non-streaming answer; the client leaving aborts it at once. A failed request
    raises its RequestFailed, an ApiError with the status to answer."""

    async def abort_on_disconnect() -> None:
        await _await_disconnect(request.receive)
        manager.abort_unfinished(group)

    watcher = asyncio.create_task(abort_on_disconnect())
    try:
        await group.wait_finished()
    finally:
        watcher.cancel()
        manager.abort_unfinished(group)  # also when this handler itself is cancelled


class EventStream(StreamingResponse):
    """A text/event-stream answer; `on_close` runs as soon as the client leaves, and at the end."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the events; a disconnect calls on_close while the generator keeps draining."""

        async def close_on_disconnect() -> None:
            await _await_disconnect(receive)
            self._on_close()

        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        watcher = asyncio.create_task(close_on_disconnect())
        try:
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(Exception):
                await self._events.aclose()
            self._on_close()
