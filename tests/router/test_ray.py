"""`radixlm serve --dp 2 --ray`: two replicas as actors on a local Ray cluster, one killed under
load and restarted by Ray, the router serving throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from conftest import listener

from radixlm.router.args import RayArgs
from radixlm.server.child_process import ServerProcess

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A cluster that ray.init starts asks its clients for the token it wrote to ~/.ray.
RAY_ENV = {**ENV, "RAY_AUTH_MODE": "token"}
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster with a CPU for each of two replicas, its dashboard off. Ray cannot
    be kept on loopback: it replaces a loopback node address with the machine's
    (`ray._private.services.resolve_ip_for_localhost`, so that other nodes can join) and its
    GCS, raylet and workers listen on every interface."""
    ray = pytest.importorskip("ray")
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _wait_workers(http: httpx.Client, server: ServerProcess, n: int) -> list[str]:
    deadline = time.monotonic() + 240
    while True:
        listed = http.get("/workers").json()
        if len(listed) == n and all(w["healthy"] and w["synced"] for w in listed):
            return [w["url"] for w in listed]
        assert time.monotonic() < deadline, (listed, server.log())
        time.sleep(0.3)


def test_ray_replica_killed_and_restarted(
    router_model: Path, ray_address: str, tmp_path: Path
) -> None:
    args = ["--dp", "2", "--ray", "--ray-address", ray_address, "--ray-num-cpus", "1"]
    args += ["--model-path", str(router_model), "--max-total-tokens", "3000"]
    server = ServerProcess.start(args, tmp_path / "ray.log", RAY_ENV, 300.0, die_with_parent=True)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            info = http.get("/get_server_info").json()
            assert info["router"]["dp"] == 2 and info["router"]["ray"]["num_cpus"] == 1
            before = _wait_workers(http, server, 2)
            long = {
                "text": "go",
                "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True},
                "stream": True,
            }
            # Different prompts: no cache match, so they spread over both replicas by work.
            prompts = [{"text": f"{i} x y", "sampling_params": GREEDY} for i in range(8)]
            with (
                http.stream("POST", "/generate", json=long) as stream,
                ThreadPoolExecutor(8) as pool,
            ):
                doomed = stream.headers["X-Radixlm-Worker"]
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                sent = [pool.submit(http.post, "/generate", json=b) for b in prompts]
                # SIGKILL the replica's actor: its server goes with it, Ray starts both anew.
                server_pid = listener(_port(doomed))
                actor_pid = psutil.Process(server_pid).ppid()
                os.kill(actor_pid, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data: ")]
                answers = [a.result() for a in sent]
            error = orjson.loads(rest[-2][6:])["error"]
            assert doomed in error["message"] and rest[-1] == "data: [DONE]"
            assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == (
                psutil.STATUS_ZOMBIE
            )
            # Requests that had streamed nothing ran elsewhere: every one has its greedy text.
            (survivor,) = set(before) - {doomed}
            expected = [httpx.post(survivor + "/generate", json=b).json()["text"] for b in prompts]
            assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
            assert [a.json()["text"] for a in answers] == expected
            # Ray restarts the replica; the router admits it at its new address.
            after = _wait_workers(http, server, 2)
            (reborn,) = set(after) - {survivor}
            assert reborn != doomed
            again = [{**b, "text": "new " + b["text"]} for b in prompts]
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda b: http.post("/generate", json=b), again))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            assert reborn in {r.headers["X-Radixlm-Worker"] for r in answers}
            assert [httpx.post(reborn + "/generate", json=b).json()["text"] for b in prompts] == (
                expected
            )
            servers = [listener(_port(u)) for u in after]
    finally:
        # A Ray driver exits with the signal's number once uvicorn re-raises SIGTERM.
        assert server.stop() in (0, signal.SIGTERM, -signal.SIGTERM), server.log()
    time.sleep(1.0)
    for pid in servers:  # the replicas' servers went with the router
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_ray_missing_is_a_clear_error(router_model: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from radixlm.cli import main\n"
        f"main(['serve', '--dp', '2', '--ray', '--port', '0', '--model-path', {str(router_model)!r}])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "--ray needs the ray package (pip install 'radixlm[ray]')" in done.stderr


def test_ray_args() -> None:
    assert RayArgs(num_cpus=2).bundle == {"CPU": 2}
    assert RayArgs(num_gpus=1).bundle == {"CPU": 1, "GPU": 1}
    for bad in ({"num_cpus": 0}, {"num_gpus": -1}):
        with pytest.raises(ValueError, match="ray_num_cpus must be positive"):
            RayArgs(**bad)
