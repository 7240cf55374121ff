"""A `radixlm serve` child process for tests: start on a free port, wait until healthy, stop."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from radixlm.server import child_process

API_KEY = "test-key"
START_TIMEOUT_S = 300.0
# The shared tiny model gets a longer context than its KV pool, so that "does not fit the pool"
# and "does not fit the context" are different errors.
TINY_CONTEXT = 4096
TINY_POOL = 2500


@dataclass
class ServerProcess(child_process.ServerProcess):
    """radixlm's child-process server plus the test's API key and HTTP clients."""

    api_key: str | None = None

    @classmethod
    def start(  # type: ignore[override]
        cls, model_path: Path | str, log_path: Path, *flags: str, api_key: str | None = API_KEY
    ) -> ServerProcess:
        """Start on a free port with model_path and flags; wait until /health is 200."""
        args = ["--model-path", str(model_path), *flags]
        if api_key is not None:
            args += ["--api-key", api_key]
        # One intra-op thread: on a shared CPU-only test machine, two OpenMP threads per forward
        # stall on each other whenever another process takes a core (each step 10-20x slower).
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        server = super().start(args, log_path, env, START_TIMEOUT_S, die_with_parent=True)
        assert isinstance(server, ServerProcess)
        server.api_key = api_key
        return server

    @property
    def headers(self) -> dict[str, str]:
        """The auth header for this server."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client with the API key set."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def async_client(self, timeout: float = 120.0) -> httpx.AsyncClient:
        """An asyncio HTTP client with the API key set and room for many connections."""
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        return httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=timeout, limits=limits
        )

    def engine_pid(self) -> int:
        """The pid of the engine process (the server's spawned child that is not a helper)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return pid
        raise RuntimeError(f"no engine process among the children {children}")


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; raises on a malformed line."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
        assert m is not None, f"malformed metrics line {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """The one sample of `name` (labels ignored)."""
    found = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def running(http: httpx.Client) -> int:
    """Requests the engine holds (running or queued)."""
    stats = http.get("/server_info").json()["internal_states"][0]
    return int(stats["num_running_reqs"] + stats["num_queue_reqs"])


def wait_idle(http: httpx.Client, timeout: float = 30.0) -> None:
    """Wait until the engine holds no request; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while running(http):
        assert time.monotonic() < deadline, "requests are still running"
        time.sleep(0.05)
