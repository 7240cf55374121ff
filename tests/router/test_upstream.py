"""The router's HTTP client of its workers against a hand-written HTTP/1.1 server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from radixlm.router.upstream import Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(request line and headers, body) of one request."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def _run(handler: Handler, client: Callable[[str], Awaitable[None]]) -> None:
    """Serve handler on a loopback port while client(base_url) runs."""

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass  # the client closed the connection, or the test ended
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            await client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

    asyncio.run(main())


def test_keeps_connections_alive_and_sends_the_request_as_given() -> None:
    connections, requests = [], []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head, body = await _read_request(reader)
            requests.append((head, body))
            answer = b"got " + body
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))

    async def client(base: str) -> None:
        up = Upstream({"Authorization": "Bearer k"}, keepalive_s=10)
        for i in range(3):
            resp = await up.request("POST", base, "/generate", b'{"i": %d}' % i)
            assert (resp.status, await resp.read()) == (200, b'got {"i": %d}' % i)
            resp.release()
        resp = await up.request("GET", base, "/v1/models", b"")
        assert await resp.read() == b"got "
        resp.release()
        up.close()

    _run(echo, client)
    assert len(connections) == 1
    head = requests[0][0].decode()
    assert head.startswith("POST /generate HTTP/1.1\r\n")
    assert "Authorization: Bearer k\r\n" in head and "content-length: 8\r\n" in head
    assert "content-length" not in requests[3][0].decode()  # a GET without a body


def test_a_kept_alive_connection_the_worker_closed_is_replaced() -> None:
    """The worker closes each connection after one answer without saying so: the next
    request goes out again on a new connection instead of failing."""
    connections = []

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def client(base: str) -> None:
        up = Upstream({}, keepalive_s=10)
        for pause in (0, 0, 0.05, 0):  # the close has reached the client, or not yet
            resp = await up.request("POST", base, "/generate", b"{}")
            assert await resp.read() == b"ok"
            resp.release()
            await asyncio.sleep(pause)

    _run(once, client)
    assert len(connections) == 4


def test_a_chunked_stream_comes_piece_by_piece() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def client(base: str) -> None:
        up = Upstream({}, keepalive_s=10)
        resp = await up.request("POST", base, "/generate", b"{}")
        assert resp.headers["transfer-encoding"] == "chunked"
        assert [c async for c in resp.chunks()] == [b"data: 1\n\n", b"data: 2\n\n"]
        resp.release()
        up.close()

    _run(stream, client)


def test_an_answer_cut_short_and_a_refused_connection_are_upstream_errors() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async def client(base: str) -> None:
        up = Upstream({}, keepalive_s=10)
        resp = await up.request("POST", base, "/generate", b"{}")
        assert resp.status == 200
        with pytest.raises(UpstreamError, match="closed before the answer ended"):
            await resp.read()
        resp.close()
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(UpstreamError, match="cannot connect"):
            await up.request("POST", f"http://127.0.0.1:{free}", "/generate", b"{}")

    _run(cut, client)
