"""Chaos fixtures: the seed each scenario runs with, and servers on the tiny model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from server.server_harness import ServerProcess


@pytest.fixture
def chaos_seed() -> Callable[[int], int]:
    """The seed a scenario runs with: its own default, or RADIXLM_CHAOS_SEED when set (to replay
    a failure, or to explore); printed, so that a failing run names it."""

    def pick(default: int) -> int:
        seed = int(os.environ.get("RADIXLM_CHAOS_SEED", default))
        print(f"chaos seed {seed} (replay with RADIXLM_CHAOS_SEED={seed})")
        return seed

    return pick


@pytest.fixture(scope="session")
def start_server(
    tiny_server_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServerProcess]:
    """Start a server on the tiny model with these flags (the caller stops it)."""

    def start(*flags: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        return ServerProcess.start(tiny_server_model, log, "--random-seed", "0", *flags)

    return start
