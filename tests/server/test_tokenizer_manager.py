"""The tokenizer manager: output routing, and an engine that dies under a running server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import ServerProcess, pid_alive

from radixlm.core.messages import GenerateRequest, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.engine.frontend import RequestState
from radixlm.server.tokenizer_manager import EngineUnavailable, RequestGroup, served_name_of
from radixlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def doomed(start_tiny_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server of its own: this module kills its engine."""
    srv = start_tiny_server()
    yield srv
    srv.stop()


def test_engine_death_fails_in_flight_requests_and_health(doomed: ServerProcess) -> None:
    body = {
        "text": "Run until killed",
        "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True},
    }
    results: dict[str, Any] = {}
    first_event = threading.Event()

    def streaming() -> None:
        events = []
        with (
            doomed.client() as c,
            c.stream("POST", "/generate", json={**body, "stream": True}) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_event.set()
        results["stream"] = events

    def waiting() -> None:
        with doomed.client() as c:
            results["plain"] = c.post("/generate", json=body)

    def chat_stream() -> None:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1800, "stream": True}
        with doomed.client() as c, c.stream("POST", "/v1/chat/completions", json=chat) as r:
            results["chat"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=f) for f in (streaming, waiting, chat_stream)]
    for t in threads:
        t.start()
    assert first_event.wait(60)
    with doomed.client() as c:
        assert c.get("/health").status_code == 200
    engine = doomed.engine_pid()
    os.kill(engine, signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a request hangs after the engine died"
    assert time.monotonic() - t0 < 30

    stream = results["stream"]
    assert stream[-1] == "[DONE]"
    error = json.loads(stream[-2])["error"]
    assert error["code"] == 503 and "engine" in error["message"]
    assert results["plain"].status_code == 503
    assert "engine" in results["plain"].json()["error"]["message"]
    assert results["chat"][-1] == "[DONE]" and "error" in json.loads(results["chat"][-2])

    with doomed.client() as c:
        health = c.get("/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        assert c.post("/generate", json={"text": "x"}).status_code == 503
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        assert c.get("/health_generate").status_code == 503
        assert c.get("/metrics").status_code == 200  # the HTTP side's own counters remain


def test_server_still_shuts_down_cleanly(doomed: ServerProcess) -> None:
    code = doomed.stop(signal.SIGTERM, timeout=30)
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in doomed.log()
    assert not pid_alive(doomed.proc.pid)


def test_request_group_coalesces_updates_and_reports_failure(tiny_server_model: Path) -> None:
    tok = Tokenizer.load(str(tiny_server_model))
    reqs = [GenerateRequest(f"r{i}", [1, 2], SamplingParams(max_new_tokens=2)) for i in range(2)]

    async def scenario() -> None:
        group = RequestGroup([RequestState(r, tok) for r in reqs], is_batch=True)
        for i in (1, 0, 1):  # three outputs before the consumer looks: one update
            group.states[i].apply(TokenOutput(f"r{i}", [5], 2, 0))
            group.notify(i)
        assert await group.updates() == [0, 1]
        waiter = asyncio.create_task(group.updates())
        await asyncio.sleep(0)
        group.fail(EngineUnavailable("gone"))
        with pytest.raises(EngineUnavailable, match="gone"):
            await waiter
        assert not group.finished

    asyncio.run(scenario())


def test_served_name_of() -> None:
    assert served_name_of("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name_of("/models/tiny-llama/") == "tiny-llama"
