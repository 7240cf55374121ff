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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
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
    """Sends requests to the workers a policy picks."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        pool: WorkerPool,
        policy: Policy,
        metrics: RouterMetrics,
    ) -> None:
        self.client = client
        self.pool = pool
        self.policy = policy
        self.metrics = metrics

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
        matched = decision.matched if decision.reason in ("cache", "work", "balance") else 0
        if not matched and ids:
            matched = w.tree.match(ids)
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
            upstream = self.client.build_request(method, worker.url + path, content=body)
            try:
                if stream:
                    resp = await self.client.send(upstream, stream=True)
                else:
                    answer = await _until_disconnect(request, self.client.send(upstream))
                    if answer is None:  # the client left: the closed connection aborted it
                        flight.end()
                        return Response(status_code=499)
                    resp = answer
            except httpx.TransportError as e:
                flight.end()
                failure = self._failed(worker, e)
                if attempt == 0:
                    self.metrics.retries += 1
                continue
            except BaseException:
                flight.end()
                raise
            headers = _headers(resp, worker)
            if not stream or resp.status_code != 200:
                if stream:
                    await resp.aread()
                    await resp.aclose()
                flight.end()
                return Response(resp.content, resp.status_code, headers)
            relay = self._relay(resp, flight, ids, key, tried, attempt)
            return RelayStream(relay, headers)
        raise EngineUnavailable(f"{failure}; no other worker could take the request")

    async def _relay(
        self,
        resp: httpx.Response,
        flight: Flight,
        ids: list[int],
        key: str | None,
        tried: set[str],
        attempt: int,
    ) -> AsyncIterator[bytes]:
        """A worker's stream, chunk by chunk; if the worker fails before the first chunk, the
        request starts again on another (once); after it, the stream ends with an error event."""
        try:
            while True:
                try:
                    async for chunk in resp.aiter_raw():
                        flight.first_output()
                        yield chunk
                    return
                except httpx.TransportError as e:
                    failure = self._failed(flight.worker, e)
                await resp.aclose()
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
                upstream = self.client.build_request(
                    resp.request.method, decision.worker.url + resp.request.url.path,
                    content=resp.request.content,
                )  # fmt: skip
                try:
                    resp = await self.client.send(upstream, stream=True)
                except httpx.TransportError as e:
                    yield sse_error(503, f"{failure}; then {self._failed(decision.worker, e)}")
                    yield DONE
                    return
                if resp.status_code != 200:
                    await resp.aread()
                    yield b"data: " + resp.content + b"\n\n"
                    yield DONE
                    return
        finally:
            flight.end()
            await resp.aclose()


def _headers(resp: httpx.Response, worker: WorkerState) -> dict[str, str]:
    headers = {k: v for k in _PASSED_HEADERS if (v := resp.headers.get(k)) is not None}
    headers[WORKER_HEADER] = worker.url
    return headers


async def _await_disconnect(receive: Receive) -> None:
    # Once the body has been read, the server's next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(
    request: Request, send: Coroutine[Any, Any, httpx.Response]
) -> httpx.Response | None:
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
