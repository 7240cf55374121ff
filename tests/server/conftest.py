"""Fixtures: real `radixlm serve` processes on free loopback ports, and clients for them; a
grammar backend over SmolLM2's tokenizer."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import TINY_POOL, ServerProcess
from tenants_harness import start_tenant_server

from radixlm.grammar.llguidance_backend import LLGuidanceBackend
from radixlm.models.default import default_model_path
from radixlm.models.gguf import convert_gguf
from radixlm.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def grammar_backend() -> tuple[LLGuidanceBackend, Tokenizer]:
    """llguidance over SmolLM2's tokenizer (no weights), for grammar tests."""
    tok = Tokenizer.load(str(convert_gguf(default_model_path(), weights=False)))
    return LLGuidanceBackend(tok), tok


@pytest.fixture(scope="session")
def start_tiny_server(
    tiny_server_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServerProcess]:
    """Start another server on the tiny model (the caller stops it)."""

    def start(*flags: str, **kwargs: Any) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        return ServerProcess.start(
            tiny_server_model, log, "--max-total-tokens", str(TINY_POOL), *flags, **kwargs
        )

    return start


@pytest.fixture(scope="package")
def server(start_tiny_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """One tiny-model server shared by the modules of this package that only send requests."""
    srv = start_tiny_server("--random-seed", "0")
    yield srv
    code = srv.stop()
    assert code in (0, -signal.SIGTERM), srv.log()


@pytest.fixture(scope="package")
def tenant_server(
    start_tiny_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A tiny-model server with tenant keys (tenants_harness.KEYS), shared by the tenant tests."""
    srv = start_tenant_server(start_tiny_server, tmp_path_factory.mktemp("keys"))
    yield srv
    code = srv.stop()
    assert code in (0, -signal.SIGTERM), srv.log()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client of the shared server."""
    with server.client() as client:
        yield client
