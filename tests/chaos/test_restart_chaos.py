"""The engine process killed (SIGKILL) in the middle of a load, round after round: the server
restarts it, streams that had sent output end with a clear error, every other request runs
again on the new engine and completes, and the server ends where it started."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chaos_harness import (
    CHAT,
    GENERATE,
    Call,
    Fate,
    check_recovered,
    check_results,
    engine_stats,
    run_round,
)
from server.server_harness import TINY_POOL, ServerProcess, metric, parse_metrics

pytestmark = pytest.mark.chaos

ROUNDS = 2  # within the default restart budget (3 in 600 s)
CALLS = 20
DIED = "exit code -9"  # what a stream cut by the kill says
REFUSED = "the engine is restarting"  # what a call sent during the restart is told
WORDS = ["kill", "restart", "engine", "queued", "held", "stream", "again", "pool", "slot"]
RESTART_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    # Few running requests: most of the load waits in the queue when the engine dies.
    srv = start_server("--max-total-tokens", str(TINY_POOL), "--max-running-requests", "4")
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def plan(rng: random.Random, tag: str) -> list[Call]:
    calls = []
    for i in range(CALLS):
        name = f"{tag}-{i}"
        route = rng.choice([GENERATE, GENERATE, CHAT])
        stream = rng.random() < 0.5
        # A stream in flight when the engine dies fails (its client saw output); any other
        # request must complete, its client having seen nothing: it runs again from the start.
        # Only a call that reaches the server while no engine runs may be refused, with a 503
        # that says so (the load is sent before the kill, but this machine can be slow).
        fate = Fate.MAY_FAIL
        error = DIED if stream else REFUSED
        # Calls that are not streams may also be aborted, or left by their clients, before,
        # during or after the restart (a stream may fail first).
        if not stream and route == GENERATE and rng.random() < 0.2:
            fate = Fate.ABORT
        elif not stream and rng.random() < 0.1:
            fate = Fate.LEAVE
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))
        params: dict[str, Any] = {"temperature": rng.choice([0.0, 0.8]), "ignore_eos": True}
        after = 0.0
        if fate in (Fate.ABORT, Fate.LEAVE):
            params["max_new_tokens"] = 1500
            after = rng.uniform(0.3, 3.0)
        else:
            params["max_new_tokens"] = rng.randint(1, 600)
        if route == GENERATE:
            body: dict[str, Any] = {
                "text": text, "sampling_params": params, "stream": stream, "rid": name
            }  # fmt: skip
        else:
            params["max_tokens"] = params.pop("max_new_tokens")
            body = {"messages": [{"role": "user", "content": text}], "stream": stream, **params}
        delay = 0.0 if fate is Fate.ABORT else rng.uniform(0, 0.3)
        calls.append(Call(name, route, body, fate, after, delay, error=error))
    return calls


async def kill_engine_later(server: ServerProcess, pid: int, after_s: float) -> None:
    """SIGKILL the engine process once the load is under way."""
    await asyncio.sleep(after_s)
    os.kill(pid, signal.SIGKILL)


def wait_restarted(server: ServerProcess, old_pid: int) -> int:
    """Wait until a new engine serves; its pid."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    with server.client() as http:
        while True:
            if http.get("/health").status_code == 200:
                pid = server.engine_pid()
                if pid != old_pid:
                    return pid
            assert time.monotonic() < deadline, "no engine came back"
            time.sleep(0.05)


def test_engine_killed_mid_load(server: ServerProcess, chaos_seed: Callable[[int], int]) -> None:
    seed = chaos_seed(31)
    pid = server.engine_pid()
    for round_ in range(ROUNDS):
        tag = f"{seed}.{round_}"
        rng = random.Random(tag)
        calls = plan(rng, tag)

        async def main(calls: list[Call], rng: random.Random, pid: int) -> Any:
            killer = kill_engine_later(server, pid, rng.uniform(0.6, 1.5))
            return await asyncio.gather(run_round(server, calls, rng, engine_may_die=True), killer)

        results, _ = asyncio.run(main(calls, rng, pid))
        check_results(results, tag)
        failed = [r for r in results if r.error and REFUSED not in r.error]
        assert all(r.call.stream for r in failed), "only a stream that had sent output may fail"
        pid = wait_restarted(server, pid)
        # The kill came mid-load: requests were held and ran again on the new engine.
        held = re.findall(r"running (\d+) requests held through the restart", server.log())
        assert len(held) == round_ + 1 and int(held[-1]) > 0, held
        print(f"round {tag}: {len(failed)} streams failed, {held[-1]} requests ran again")
        with server.client() as http:
            samples = parse_metrics(http.get("/metrics").text)
            assert metric(samples, "sglang:engine_restarts_total") == round_ + 1
            check_recovered(http, TINY_POOL)
            assert engine_stats(http)["num_running_reqs"] == 0
