"""A worker killed under the router: unstarted requests run elsewhere, started streams end with
an error, the router keeps serving."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import orjson
from conftest import client

from radixlm.server.child_process import ServerProcess


def kill_tree(server: ServerProcess) -> None:
    """SIGKILL a worker and its engine process, as a machine failure would."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    server.proc.kill()
    for child in map(int, children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    server.proc.wait()


def test_worker_killed(
    start_worker: Callable[..., ServerProcess], start_router: Callable[..., ServerProcess]
) -> None:
    survivor, idle, streaming = start_worker(), start_worker(), start_worker()
    # Round robin, and health checks too rare to notice a death before requests do.
    router = start_router(
        [survivor, idle, streaming], "--policy", "round_robin", "--health-check-interval-s", "60"
    )
    try:
        with client(router) as http:
            # Killed while idle: the request round robin sends there fails to connect and is
            # retried once on another worker; the dead one is taken out of routing.
            kill_tree(idle)
            body = {"text": "hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
            answers = [http.post("/generate", json=body) for _ in range(4)]
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            assert idle.url not in {r.headers["X-Radixlm-Worker"] for r in answers}
            assert "radixlm_router:retries_total 1\n" in http.get("/metrics").text
            # Killed mid-stream: the stream ends with an error event naming the worker.
            long = {
                "text": "go",
                "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True},
                "stream": True,
            }
            with (
                http.stream("POST", "/generate", json=long) as a,
                http.stream("POST", "/generate", json=long) as b,
            ):
                on_doomed = a if a.headers["X-Radixlm-Worker"] == streaming.url else b
                assert on_doomed.headers["X-Radixlm-Worker"] == streaming.url
                lines = on_doomed.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                kill_tree(streaming)
                rest = [line for line in lines if line.startswith("data: ")]
            error = orjson.loads(rest[-2][6:])["error"]
            assert streaming.url in error["message"] and "middle of the answer" in error["message"]
            assert rest[-1] == "data: [DONE]"
            listed = {w["url"]: w for w in http.get("/workers").json()}
            assert [u for u, w in listed.items() if w["healthy"]] == [survivor.url]
            assert http.post("/generate", json=body).headers["X-Radixlm-Worker"] == survivor.url
    finally:
        router.stop()
        survivor.stop()
