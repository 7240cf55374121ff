"""Fixtures: real `radixlm serve` workers on the tiny model, and routers in front of them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from radixlm.server.child_process import ServerProcess

API_KEY = "router-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# One intra-op thread per engine: the test machine's cores are shared (see tests/server).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def router_model(
    make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny random model the workers load."""
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=2048
    )


@pytest.fixture(scope="session")
def start_worker(
    router_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServerProcess]:
    """Start a worker (the caller stops it)."""

    def start(*flags: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        args = ["--model-path", str(router_model), "--max-total-tokens", "3000"]
        args += ["--random-seed", "0", "--api-key", API_KEY, *flags]
        return ServerProcess.start(args, log, ENV, 300.0, die_with_parent=True)

    return start


@pytest.fixture(scope="session")
def start_router(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ServerProcess]:
    """Start a router in front of workers (the caller stops it); waits until it has a tokenizer
    and has mirrored every worker's cache."""

    def start(workers: list[ServerProcess], *flags: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("router") / "router.log"
        args = ["--worker-urls", *[w.url for w in workers], "--api-key", API_KEY, *flags]
        router = ServerProcess.start(args, log, ENV, 120.0, command="router", die_with_parent=True)
        deadline = time.monotonic() + 60
        with client(router) as http:
            while True:
                listed = http.get("/workers").json()
                if all(w["healthy"] and w["synced"] for w in listed) and ready(http):
                    break
                assert time.monotonic() < deadline, (listed, router.log())
                time.sleep(0.1)
        return router

    return start


def ready(http: httpx.Client) -> bool:
    """Whether the router tokenizes prompts already."""
    return bool(http.get("/get_server_info").json()["router"]["tokenizer_ready"])


def listener(port: int) -> int:
    """The process listening on a TCP port of this machine."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"nothing listens on port {port}")


def client(server: ServerProcess, timeout: float = 120.0) -> httpx.Client:
    """An HTTP client with the API key."""
    return httpx.Client(base_url=server.url, headers=HEADERS, timeout=timeout)


@pytest.fixture(scope="module")
def workers(start_worker: Callable[..., ServerProcess]) -> Iterator[list[ServerProcess]]:
    """Two workers shared by a module's tests."""
    started = [start_worker(), start_worker()]
    yield started
    for w in started:
        assert w.stop() in (0, -signal.SIGTERM), w.log()
