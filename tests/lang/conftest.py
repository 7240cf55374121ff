"""Fixtures for the language tests: a scripted fake backend, and SmolLM2 in-process and over HTTP."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from lang_helpers import FakeBackend, Server

from radixlm.server.child_process import ServerProcess

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
    """A SmolLM2 server on a free port; a server that cannot start fails the tests that need it."""
    log_path = tmp_path_factory.mktemp("lang-server") / "server.log"
    args = ["--model-path", smollm2_path, "--random-seed", "0"]
    with ServerProcess.start(
        args, log_path, timeout=SERVER_START_TIMEOUT_S, die_with_parent=True
    ) as srv:
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as resp:
            model = re.search(rb'"id"\s*:\s*"([^"]+)"', resp.read())
        assert model is not None
        yield Server(srv.proc, srv.url, model.group(1).decode())
