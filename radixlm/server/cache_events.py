"""GET /cache_events: the engine's radix-tree changes as a stream, for `radixlm router`.

One drain loop runs while anyone listens: it asks the core for the changes since the last drain
(a control call, answered between two steps) and sends each non-empty batch to every listener as
one NDJSON line `{"snapshot": [[parent, [ids]], ...] | null, "events": [[kind, [ids], depth],
...]}`. A new listener, and every listener after an engine restart, first gets a snapshot of the
whole tree; a listener that falls behind is dropped (it reconnects and resyncs from a snapshot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from typing_extensions import TypedDict

from radixlm.core.messages import CacheEventBatch, DrainCacheEvents
from radixlm.server.auth import require_admin
from radixlm.server.errors import EngineUnavailable
from radixlm.server.openapi import error_responses, schema_of
from radixlm.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

# Seconds between two drains: how stale a router's mirror may be, beyond one engine step.
DRAIN_INTERVAL_S = 0.01
# Seconds to wait after the engine did not answer (down or restarting).
RETRY_INTERVAL_S = 0.5
# Batches a listener may have unread before it is dropped.
MAX_PENDING_BATCHES = 1024
# An empty line this often keeps idle connections open and shows the listener we are alive.
KEEPALIVE_S = 5.0


class CacheEventHub:
    """Fans the engine's cache events out to the listeners of /cache_events."""

    def __init__(self, manager: TokenizerManager) -> None:
        self.manager = manager
        self._listeners: set[asyncio.Queue[bytes | None]] = set()
        self._need_snapshot = False
        self._task: asyncio.Task[None] | None = None

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        """A new listener's queue of NDJSON lines (None: it fell behind and must reconnect)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._listeners.add(queue)
        self._need_snapshot = True  # everyone gets it: harmless for mirrors already in sync
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        """Stop feeding a listener."""
        self._listeners.discard(queue)

    async def _pump(self) -> None:
        while self._listeners:
            snapshot, self._need_snapshot = self._need_snapshot, False
            try:
                batch = await self.manager.control(DrainCacheEvents(snapshot))
            except EngineUnavailable:
                self._need_snapshot = True  # a restarted engine starts from an empty tree
                await asyncio.sleep(RETRY_INTERVAL_S)
                continue
            assert isinstance(batch, CacheEventBatch)
            if batch.snapshot is not None or batch.events:
                line = orjson.dumps({"snapshot": batch.snapshot, "events": batch.events}) + b"\n"
                for queue in list(self._listeners):
                    if queue.qsize() >= MAX_PENDING_BATCHES:
                        self._listeners.discard(queue)
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(line)
            await asyncio.sleep(DRAIN_INTERVAL_S)

    async def stream(self) -> AsyncIterator[bytes]:
        """One listener's lines, until it disconnects or falls behind."""
        queue = self.subscribe()
        try:
            while True:
                try:
                    line = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    line = b"\n"
                if line is None:
                    return
                yield line
        finally:
            self.unsubscribe(queue)


class CacheEventsLine(TypedDict):
    """One batch: the whole tree (`[parent index or -1, token ids]` in preorder) if `snapshot`
    is set, then `events` in order: `[kind, token ids, depth]`."""

    snapshot: list[tuple[int, list[int]]] | None
    events: list[tuple[str, list[int], int]]


def cache_events_router(manager: TokenizerManager) -> APIRouter:
    """The /cache_events route over one tokenizer manager."""
    router = APIRouter()
    hub = CacheEventHub(manager)

    @router.get(
        "/cache_events",
        responses={
            200: {
                "description": "The radix tree's changes, one JSON object a line, until the "
                "listener leaves (an empty line now and then keeps the connection open)",
                "content": {"application/x-ndjson": {"schema": schema_of(CacheEventsLine)}},
            },
            **error_responses(403, 503),
        },
    )
    async def cache_events(request: Request) -> Response:
        """The engine's radix-tree inserts and evictions as a stream, for `radixlm router`
        (admins only: it carries the shared namespace's token ids)."""
        require_admin(request)
        manager.check_ready()
        return StreamingResponse(hub.stream(), media_type="application/x-ndjson")

    return router
