"""The router's HTTP/1.1 client of its workers: kept-alive connections per worker, answers parsed
by httptools (C), bodies read whole or chunk by chunk.

The forwarding path's client: per request it writes one buffer and parses the answer in C, a
fraction of the CPU time of a general client (docs/benchmarks.md). It speaks only what the
workers answer (a content-length, chunked, or a body up to the connection's end).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 5.0
# A connection stops reading while this much of its answer waits for the client.
HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """The connection to a worker failed: refused, reset, closed before the answer ended, or
    the answer malformed."""


class _Connection(asyncio.Protocol):
    """One connection to a worker, carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received = False  # a byte of the current answer came
        self.keep_alive = False
        self.complete = False
        self._headers_done: asyncio.Future[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._error: UpstreamError | None = None

    def send(self, data: bytes) -> asyncio.Future[None]:
        """Write a request; the future resolves once its answer's headers are parsed."""
        assert self.transport is not None and not self.closed
        self.status, self.headers, self.received, self.complete = 0, {}, False, False
        self.keep_alive = False
        self._chunks.clear()
        self._buffered = 0
        self._error = None
        self._headers_done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._headers_done

    async def next_chunk(self) -> bytes | None:
        """The next piece of the answer's body; None at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered == 0 and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None

    def close(self) -> None:
        """Close the connection (a worker aborts the request it was answering)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        """Parse what came."""
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed answer: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection ended: the answer too, if its length was up to the end."""
        self.closed = True
        reads_to_end = "content-length" not in self.headers and (
            "transfer-encoding" not in self.headers
        )
        if self._headers_done is not None and self._headers_done.done() and reads_to_end:
            self.on_message_complete()
        elif not self.complete:
            why = f": {type(exc).__name__}: {exc}" if exc else ""
            self._fail(UpstreamError(f"the connection closed before the answer ended{why}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header of the answer."""
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        """The status and headers are known."""
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # unknown once the answer ended
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        """A piece of the body (chunked encoding already undone)."""
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        """The answer ended."""
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


class UpstreamResponse:
    """A worker's answer: status and headers (lowercase names), the body still to read. The
    caller must end it with `release` (once read to its end) or `close`."""

    def __init__(self, client: Upstream, base: str, conn: _Connection) -> None:
        self._client = client
        self._base = base
        self._conn = conn
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    async def read(self) -> bytes:
        """The whole body."""
        chunks = []
        while (chunk := await self._conn.next_chunk()) is not None:
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they come; UpstreamError if the connection breaks first."""
        while (chunk := await self._conn.next_chunk()) is not None:
            yield chunk

    def release(self) -> None:
        """Keep the connection for another request if the answer was read to its end."""
        conn = self._conn
        if conn.complete and not conn.closed and conn.keep_alive:
            conn.idle_since = time.monotonic()
            self._client._idle[self._base].append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection: a worker aborts the request if it was still answering."""
        self._conn.close()


class Upstream:
    """Connections to the workers, kept alive between requests for up to `keepalive_s`."""

    def __init__(self, headers: Mapping[str, str], keepalive_s: float) -> None:
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self.keepalive_s = keepalive_s
        self._idle: collections.defaultdict[str, list[_Connection]] = collections.defaultdict(list)
        self._hosts: dict[str, tuple[str, int, bytes]] = {}

    async def request(self, method: str, base: str, path: str, body: bytes) -> UpstreamResponse:
        """Send a request to the worker at `base` (scheme://host:port); its answer once the
        headers came. UpstreamError if the connection fails first. Cancelling it closes the
        connection."""
        host, port, host_header = self._host(base)
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s" % (
            method.encode(),
            path.encode(),
            host_header,
            self._extra,
        )
        if body or method == "POST":
            head += b"content-length: %d\r\n" % len(body)
        data = head + b"\r\n" + body
        conn = self._take(base)
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port)
            try:
                await conn.send(data)
            except UpstreamError:
                conn.close()
                if reused and not conn.received:
                    # The worker closed the kept-alive connection as it was reused: it never
                    # saw the request. Send it once more on a new connection.
                    conn = None
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, base, conn)

    def close(self) -> None:
        """Close the idle connections."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _host(self, base: str) -> tuple[str, int, bytes]:
        known = self._hosts.get(base)
        if known is None:
            parts = urlsplit(base)
            if parts.scheme != "http" or parts.hostname is None:
                raise UpstreamError(f"cannot reach {base}: only http:// workers are supported")
            known = (parts.hostname, parts.port or 80, parts.netloc.encode())
            self._hosts[base] = known
        return known

    def _take(self, base: str) -> _Connection | None:
        """The most recently used idle connection to `base` still open and fresh, if any."""
        idle = self._idle.get(base)
        oldest = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= oldest:
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {host}:{port}: {type(e).__name__}: {e}") from e
        return conn
