"""Fixtures for the language tests: a scripted fake backend, and SmolLM2 in-process and over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lang_helpers import FakeBackend, Server

SERVER_START_TIMEOUT_S = 180.0


@pytest.fixture
def fake() -> FakeBackend:
    """A fake backend that answers every gen with "<gen>"."""
    return FakeBackend()


@pytest.fixture(scope="session")
def engine(smollm2_path: str) -> Iterator[Any]:
    """The embedded SmolLM2 in-process, shared by the language tests."""
    from radixlm.engine.engine import Engine

    with Engine(smollm2_path, random_seed=0) as e:
        yield e


@pytest.fixture(scope="session")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A SmolLM2 server on a free port; the tests that need it skip if it cannot start."""
    log_path = tmp_path_factory.mktemp("lang-server") / "server.log"
    cmd = [sys.executable, "-m", "radixlm", "serve", "--model-path", smollm2_path, "--port", "0"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--random-seed", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        url = _wait_healthy(proc, log_path)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            model = re.search(rb'"id"\s*:\s*"([^"]+)"', resp.read())
        assert model is not None
        yield Server(proc, url, model.group(1).decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    url = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(
                f"radixlm serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        if not url and (m := re.search(r"listening on (http://[\d.]+:\d+)", log_path.read_text())):
            url = m.group(1)
        if url:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.3)
    pytest.skip(f"radixlm serve did not become healthy: {log_path.read_text()[-2000:]}")
