"""`radixlm serve`: signals stop the server and its engine; a model that cannot load exits 1."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProcess, pid_alive

from radixlm.server import child_process


def test_sigint_with_a_stream_in_flight(start_tiny_server: Callable[..., ServerProcess]) -> None:
    srv = start_tiny_server()
    try:
        engine = srv.engine_pid()
        got_event = threading.Event()
        ended: list[str] = []

        def stream() -> None:
            body = {"text": "Long", "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}}
            try:
                with (
                    srv.client() as c,
                    c.stream("POST", "/generate", json={**body, "stream": True}) as r,
                ):
                    for _ in r.iter_lines():
                        got_event.set()
                ended.append("closed")
            except httpx.HTTPError as e:
                ended.append(type(e).__name__)

        t = threading.Thread(target=stream)
        t.start()
        assert got_event.wait(60)
        code = srv.stop(signal.SIGINT, timeout=40)
        t.join(10)
        assert ended, "the client stream did not end when the server stopped"
        assert code in (0, 130, -signal.SIGINT), srv.log()
        deadline = time.monotonic() + 10
        while pid_alive(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(engine), "the engine process outlived the server"
        assert "Traceback" not in srv.log()
    finally:
        srv.stop(signal.SIGKILL)


def test_a_model_that_cannot_load_exits_with_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "radixlm", "serve", "--model-path", str(missing), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "the engine failed to start" in proc.stderr and str(missing) in proc.stderr


def test_a_taken_port_exits_with_1(tmp_path: Path) -> None:
    from radixlm.server.launch import bind

    with bind("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "radixlm",
                "serve",
                "--model-path",
                str(tmp_path),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_child_process_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    """ServerProcess.start raises with the server's own error when it exits during start-up."""
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="exited with") as info:
        child_process.ServerProcess.start(["--model-path", str(tmp_path / "missing")], log)
    assert "missing" in str(info.value)


def test_accepted_connections_have_nagle_off() -> None:
    """Without TCP_NODELAY, each answer on a kept-alive connection waited ~40 ms for the
    client's delayed ACK (asyncio sets it only on sockets whose proto is TCP, and ours is 0)."""
    from radixlm.server.launch import bind

    with bind("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_server_started_to_die_with_its_parent_goes_when_the_parent_aborts(
    tiny_server_model: Path, tmp_path: Path
) -> None:
    """die_with_parent (what the benchmarks start their servers with): a parent that aborts,
    skipping every cleanup, takes its server with it; without it the server would live on."""
    script = (
        "import os\n"
        "from radixlm.server.child_process import ServerProcess\n"
        f"args = ['--model-path', {str(tiny_server_model)!r}, '--max-total-tokens', '64']\n"
        f"srv = ServerProcess.start(args, {str(tmp_path / 'server.log')!r}, die_with_parent=True)\n"
        "print(srv.proc.pid, flush=True)\n"
        "os.abort()\n"
    )
    parent = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert parent.returncode == -signal.SIGABRT, parent.stderr
    server_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 30
    while pid_alive(server_pid):
        assert time.monotonic() < deadline, "the server outlived its parent"
        time.sleep(0.1)
