"""Forwarding one request to a worker: pick it, relay its answer, retry once if it dies first.

A request that fails at the connection before anything of its answer reached the client (the
worker died, or was unreachable) is sent once more to another worker; one that fails after its
stream started ends with an error event. A client that leaves closes the upstream connection,
which aborts the request in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from radixlm.router.metrics import RouterMetrics
from radixlm.router.policy import Decision, Policy, WorkerState
from radixlm.router.upstream import Upstream, UpstreamError, UpstreamResponse
from radixlm.router.workers import WorkerPool
from radixlm.server.errors import ApiError, EngineUnavailable
from radixlm.server.http import sse_error

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-Radixlm-Worker"
# Headers of a worker's answer that reach the client.
_PASSED_HEADERS = tuple(
    (name, name.encode()) for name in ("content-type", "retry-after", "cache-control")
)
_WORKER_HEADER = WORKER_HEADER.lower().encode()
DONE = b"data: [DONE]\n\n"
# Idle upstream connections are dropped before a uvicorn worker's keep-alive (5 s) closes them, so
# a request seldom meets a connection the worker is closing (a failure that would be retried).
KEEPALIVE_S = 4.0


@dataclass(slots=True, eq=False)
class Flight:
    """One request's share of a worker's estimated work, from sending until its answer ends."""

    worker: WorkerState
    uncached: int
    started: bool = False  # output came back: it decodes now
    ended: bool = False

    def __post_init__(self) -> None:
        self.worker.in_flight += 1
        self.worker.prefill_tokens += self.uncached

    def first_output(self) -> None:
        """Its prefill is done."""
        if not self.started and not self.ended:
            self.started = True
            self.worker.prefill_tokens -= self.uncached
            self.worker.decoding += 1

    def end(self) -> None:
        """Its answer ended (or failed); idempotent."""
        if self.ended:
            return
        self.ended = True
        self.worker.in_flight -= 1
        if self.started:
            self.worker.decoding -= 1
        else:
            self.worker.prefill_tokens -= self.uncached


class Forwarder:
    """Sends requests to the workers a policy picks, over the router's own lean client."""

    def __init__(
        self, headers: dict[str, str], pool: WorkerPool, policy: Policy, metrics: RouterMetrics
    ) -> None:
        self.headers = headers
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self._upstream: Upstream | None = None

    async def start(self) -> None:
        """Open the upstream connection pool (in the event loop that will use it)."""
        self._upstream = Upstream(self.headers, KEEPALIVE_S)

    async def close(self) -> None:
        """Close the idle upstream connections."""
        if self._upstream is not None:
            self._upstream.close()

    async def _open(
        self, method: str, worker: WorkerState, path: str, body: bytes
    ) -> UpstreamResponse:
        """The worker's answer, its body still to read."""
        assert self._upstream is not None, "Forwarder.start() first"
        return await self._upstream.request(method, worker.url, path, body)

    async def _fetch(self, method: str, worker: WorkerState, path: str, body: bytes) -> Answer:
        """The worker's whole answer; cancelling it closes the connection (aborting the request)."""
        resp = await self._open(method, worker, path, body)
        try:
            content = await resp.read()
        except BaseException:
            resp.close()
            raise
        resp.release()
        return Answer(resp.status, resp.headers, content)

    def choose(self, ids: list[int], key: str | None, exclude: set[str]) -> Decision:
        """The worker for a prompt among the healthy ones not in exclude; 503 if none."""
        workers = [w for w in self.pool.healthy() if w.url not in exclude]
        if not workers:
            raise EngineUnavailable("no healthy worker to send the request to", retry_after_s=2)
        decision = self.policy.choose(workers, ids, key)
        self.metrics.on_route(decision)
        return decision

    def _flight(self, decision: Decision, ids: list[int]) -> Flight:
        w = decision.worker
        matched = decision.matched
        if matched is None:
            matched = w.tree.match(ids) if ids else 0
        return Flight(w, len(ids) - matched)

    def _failed(self, worker: WorkerState, error: Exception) -> str:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.pool.mark_failed(worker, reason)
        return f"worker {worker.url} failed ({reason})"

    async def forward(
        self,
        receive: Receive,
        method: str,
        path: str,
        body: bytes,
        ids: list[int],
        key: str | None,
        stream: bool,
    ) -> ASGIApp:
        """The answer of one worker to the request, as an ASGI app to send it with; streamed
        if `stream`. `receive` is the client's, its body already read: it tells when the
        client leaves."""
        tried: set[str] = set()
        failure = ""
        for attempt in range(2):
            decision = self.choose(ids, key, tried)
            worker = decision.worker
            tried.add(worker.url)
            flight = self._flight(decision, ids)
            try:
                if not stream:
                    answer = await _until_disconnect(
                        receive, self._fetch(method, worker, path, body)
                    )
                    flight.end()
                    if answer is None:  # the client left: the closed connection aborted it
                        return Reply(499, [], b"")
                    return Reply(answer.status, _headers(answer.headers, worker), answer.body)
                resp = await self._open(method, worker, path, body)
            except UpstreamError as e:
                flight.end()
                failure = self._failed(worker, e)
                if attempt == 0:
                    self.metrics.retries += 1
                continue
            except BaseException:
                flight.end()
                raise
            headers = _headers(resp.headers, worker)
            if resp.status != 200:
                try:
                    content = await resp.read()
                finally:
                    resp.release()
                    flight.end()
                return Reply(resp.status, headers, content)
            relay = self._relay(resp, flight, method, path, body, ids, key, tried, attempt)
            return RelayStream(relay, headers)
        raise EngineUnavailable(f"{failure}; no other worker could take the request")

    async def _relay(
        self,
        resp: UpstreamResponse,
        flight: Flight,
        method: str,
        path: str,
        body: bytes,
        ids: list[int],
        key: str | None,
        tried: set[str],
        attempt: int,
    ) -> AsyncIterator[bytes]:
        """A worker's stream, chunk by chunk; if the worker fails before the first chunk, the
        request starts again on another (once); after it, the stream ends with an error event."""
        ended = False  # the answer was read to its end: its connection can be reused
        try:
            while True:
                try:
                    async for chunk in resp.chunks():
                        flight.first_output()
                        yield chunk
                    ended = True
                    return
                except UpstreamError as e:
                    failure = self._failed(flight.worker, e)
                resp.close()
                flight.end()
                if flight.started or attempt > 0:
                    self.metrics.stream_errors += 1
                    yield sse_error(503, f"{failure} in the middle of the answer")
                    yield DONE
                    return
                attempt += 1
                self.metrics.retries += 1
                try:
                    decision = self.choose(ids, key, tried)
                except ApiError as e:
                    yield sse_error(e.status, f"{failure}; {e}")
                    yield DONE
                    return
                tried.add(decision.worker.url)
                flight = self._flight(decision, ids)
                try:
                    resp = await self._open(method, decision.worker, path, body)
                except UpstreamError as e:
                    yield sse_error(503, f"{failure}; then {self._failed(decision.worker, e)}")
                    yield DONE
                    return
                if resp.status != 200:
                    content = await resp.read()
                    ended = True
                    yield b"data: " + content + b"\n\n"
                    yield DONE
                    return
        finally:
            flight.end()
            # Closing a connection in the middle of an answer aborts the request in the worker.
            if ended:
                resp.release()
            else:
                resp.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """A worker's whole answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer for the client, as an ASGI app."""

    status: int
    headers: list[tuple[bytes, bytes]]  # content-length added when sent
    body: bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send it."""
        headers = [*self.headers, (b"content-length", b"%d" % len(self.body))]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _headers(upstream: Mapping[str, str], worker: WorkerState) -> list[tuple[bytes, bytes]]:
    headers = [
        (raw, value.encode("latin-1"))
        for name, raw in _PASSED_HEADERS
        if (value := upstream.get(name)) is not None
    ]
    headers.append((_WORKER_HEADER, worker.url.encode()))
    return headers


async def _await_disconnect(receive: Receive) -> None:
    # Once the body has been read, the server's next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


T = TypeVar("T")


async def _until_disconnect(receive: Receive, call: Awaitable[T]) -> T | None:
    """Await call in this task; None (and call cancelled) if the client leaves first. One
    watcher task per request, which cancels this one when the client leaves."""
    task = asyncio.current_task()
    assert task is not None
    finished = left = False

    async def watch() -> None:
        nonlocal left
        await _await_disconnect(receive)
        if not finished:
            left = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await call
    except asyncio.CancelledError:
        if not left:
            raise
        if hasattr(task, "uncancel"):  # Python 3.11+: the cancel was ours, not the caller's
            task.uncancel()
        return None
    finally:
        finished = True
        watcher.cancel()
    return result


class RelayStream:
    """A relayed stream, as an ASGI app; the client leaving cancels the relay, which closes
    the upstream."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the chunks until they end or the client leaves."""

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        relay = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_await_disconnect(receive))
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not relay.done():
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await relay
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
