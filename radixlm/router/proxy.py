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
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from radixlm.router.metrics import RouterMetrics
from radixlm.router.policy import Decision, Policy, WorkerState
from radixlm.router.workers import WorkerPool
from radixlm.server.errors import ApiError, EngineUnavailable
from radixlm.server.http import sse_error

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-Radixlm-Worker"
# Headers of a worker's answer that reach the client.
_PASSED_HEADERS = ("content-type", "retry-after", "cache-control")
DONE = b"data: [DONE]\n\n"
# A worker's connection failed: refused, reset, closed early, or cut inside an answer.
UPSTREAM_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
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
    """Sends requests to the workers a policy picks, over aiohttp: the router spends about half
    the CPU time per request that it did over httpx's client (docs/benchmarks.md)."""

    def __init__(
        self, headers: dict[str, str], pool: WorkerPool, policy: Policy, metrics: RouterMetrics
    ) -> None:
        self.headers = headers
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the upstream connection pool (in the event loop that will use it)."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4096, keepalive_timeout=KEEPALIVE_S),
            # A bounded wait to connect, none for an answer: a long generation may take minutes
            # and a dead worker resets the connection.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
            headers=self.headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Content-Type",),  # the body is passed as it came
        )

    async def close(self) -> None:
        """Close the upstream connections."""
        if self._session is not None:
            await self._session.close()

    async def _open(self, method: str, url: str, body: bytes) -> aiohttp.ClientResponse:
        """The worker's answer, its body still to read."""
        assert self._session is not None, "Forwarder.start() first"
        return await self._session.request(method, url, data=body or None)

    async def _fetch(self, method: str, url: str, body: bytes) -> Answer:
        """The worker's whole answer; cancelling it closes the connection (aborting the request)."""
        resp = await self._open(method, url, body)
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
        request: Request,
        method: str,
        path: str,
        body: bytes,
        ids: list[int],
        key: str | None,
        stream: bool,
    ) -> Response:
        """The answer of one worker to the request; streamed if `stream`."""
        tried: set[str] = set()
        failure = ""
        for attempt in range(2):
            decision = self.choose(ids, key, tried)
            worker = decision.worker
            tried.add(worker.url)
            flight = self._flight(decision, ids)
            url = worker.url + path
            try:
                if not stream:
                    answer = await _until_disconnect(request, self._fetch(method, url, body))
                    flight.end()
                    if answer is None:  # the client left: the closed connection aborted it
                        return Response(status_code=499)
                    return Response(answer.body, answer.status, _headers(answer.headers, worker))
                resp = await self._open(method, url, body)
            except UPSTREAM_ERRORS as e:
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
                return Response(content, resp.status, headers)
            relay = self._relay(resp, flight, method, path, body, ids, key, tried, attempt)
            return RelayStream(relay, headers)
        raise EngineUnavailable(f"{failure}; no other worker could take the request")

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
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
                    async for chunk in resp.content.iter_any():
                        flight.first_output()
                        yield chunk
                    ended = True
                    return
                except UPSTREAM_ERRORS as e:
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
                    resp = await self._open(method, decision.worker.url + path, body)
                except UPSTREAM_ERRORS as e:
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


def _headers(upstream: Mapping[str, str], worker: WorkerState) -> dict[str, str]:
    headers = {k: v for k in _PASSED_HEADERS if (v := upstream.get(k)) is not None}
    headers[WORKER_HEADER] = worker.url
    return headers


async def _await_disconnect(receive: Receive) -> None:
    # Once the body has been read, the server's next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, send: Coroutine[Any, Any, Answer]) -> Answer | None:
    """Await the upstream answer; None (and the upstream call cancelled) if the client leaves."""
    answer = asyncio.ensure_future(send)
    watcher = asyncio.ensure_future(_await_disconnect(request.receive))
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not answer.done():
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer
        watcher.cancel()
    return answer.result() if not answer.cancelled() else None


class RelayStream(Response):
    """A relayed stream; the client leaving cancels the relay, which closes the upstream."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the chunks until they end or the client leaves."""

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
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
