"""Chaos fixtures: the seed each scenario runs with, and servers on the tiny model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from server.server_harness import TINY_CONTEXT, ServerProcess


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
def chaos_model(
    make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny random model the chaos servers load, with a 4096-token context."""
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=TINY_CONTEXT
    )


@pytest.fixture(scope="session")
def start_server(
    chaos_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ServerProcess]:
    """Start a server on the tiny model with these flags (the caller stops it)."""

    def start(*flags: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        return ServerProcess.start(chaos_model, log, "--random-seed", "0", *flags)

    return start
