"""`radixlm serve --dp 2`: two engine servers and the router on one port."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import listener

from radixlm.server.child_process import ServerProcess


def test_serve_dp_2(router_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--dp", "2", "--model-path", str(router_model), "--max-total-tokens", "3000"]
    server = ServerProcess.start(args, tmp_path / "dp.log", env, 300.0, die_with_parent=True)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            info = http.get("/get_server_info").json()
            assert info["router"]["dp"] == 2 and len(info["workers"]) == 2
            worker_pids = [
                int(p)
                for p in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
                .read_text()
                .split()
            ]
            body = {
                "text": ["a b c", "d e f"],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            }
            out = http.post("/generate", json=body)
            assert out.status_code == 200 and len(out.json()) == 2
            assert http.post("/flush_cache").status_code == 200
            assert http.post("/abort_request", json={"abort_all": True}).json() == {"aborted": 0}
            assert 'sglang:num_requests_total{worker="' in http.get("/metrics").text
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log()
    for pid in worker_pids:  # the engine servers went with it
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_serve_dp_restarts_a_dead_replica(router_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--dp", "2", "--model-path", str(router_model), "--max-total-tokens", "3000"]
    server = ServerProcess.start(args, tmp_path / "dp.log", env, 300.0, die_with_parent=True)
    body = {"text": "a b c", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            before = [w["url"] for w in http.get("/workers").json()]
            expected = http.post("/generate", json=body).json()["text"]
            doomed = http.post("/generate", json=body).headers["X-Radixlm-Worker"]
            survivor = next(u for u in before if u != doomed)
            # SIGKILL the replica's server and its engine, as a crash would.
            pid = listener(int(doomed.rsplit(":", 1)[1]))
            for child in _children(pid):
                os.kill(child, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            # The router keeps serving from the other replica meanwhile.
            while True:
                answer = http.post("/generate", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["text"] == expected
                listed = http.get("/workers").json()
                if doomed not in {w["url"] for w in listed}:
                    break
                time.sleep(0.2)
            deadline = time.monotonic() + 240
            while not (len(listed) == 2 and all(w["healthy"] and w["synced"] for w in listed)):
                assert time.monotonic() < deadline, (listed, server.log())
                answer = http.post("/generate", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.headers["X-Radixlm-Worker"] == survivor
                time.sleep(0.5)
                listed = http.get("/workers").json()
            (reborn,) = {w["url"] for w in listed} - {survivor}
            # Re-admitted: concurrent requests reach it, and its output is the same.
            prompts = [{**body, "text": f"{i} x y"} for i in range(8)]
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda b: http.post("/generate", json=b), prompts))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            assert reborn in {a.headers["X-Radixlm-Worker"] for a in answers}
            assert httpx.post(reborn + "/generate", json=body).json()["text"] == expected
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log()
