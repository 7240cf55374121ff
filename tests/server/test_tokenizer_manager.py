"""The tokenizer manager: output routing, metrics, aborts and control calls over a fake engine
core, and an engine that dies under a running server."""

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
from server_harness import (
    TINY_CONTEXT,
    TINY_POOL,
    ServerProcess,
    metric,
    parse_metrics,
    pid_alive,
)

from radixlm.core.finish import FinishReason
from radixlm.core.messages import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    CoreInfo,
    FlushCache,
    GenerateRequest,
    Message,
    TokenOutput,
)
from radixlm.engine.args import EngineArgs
from radixlm.engine.client import EngineDeadError
from radixlm.engine.frontend import GenerateInput
from radixlm.server.errors import EngineUnavailable, Overloaded
from radixlm.server.tokenizer_manager import TokenizerManager, served_name_of
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


class FakeTransport:
    """An engine core played by the test: it reads what was sent and emits by hand."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closed = False

    def start(
        self,
        on_outputs: Callable[[list[TokenOutput | ControlReply]], None],
        on_exit: Callable[[EngineDeadError], None],
    ) -> None:
        self.emit, self.exit = on_outputs, on_exit

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True


def attached(
    model: Path, max_running: int = 256, max_queued: int = 4096
) -> tuple[TokenizerManager, FakeTransport]:
    """A manager serving from a fake core (call on the event loop)."""
    manager = TokenizerManager(EngineArgs(model_path=str(model)), max_queued)
    with pytest.raises(EngineUnavailable, match="starting"):
        manager.check_ready()
    tok = Tokenizer.load(str(model))
    info = CoreInfo(
        model_path=str(model),
        context_len=TINY_CONTEXT,
        vocab_size=tok.vocab_size,
        max_total_num_tokens=TINY_POOL,
        chunked_prefill_size=2048,
        max_running_requests=max_running,
        device="cpu",
        dtype="float32",
        kernel_backend="torch",
        load_seconds=0.0,
    )
    transport = FakeTransport()
    manager.attach(transport, info, tok)
    assert manager.ready
    return manager, transport


def test_outputs_reach_their_group_and_the_metrics(tiny_server_model: Path) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model)
        group = await manager.submit(GenerateInput(text=["hello", "there"], rid=["a", "b"]))
        assert [m.rid for m in core.sent if isinstance(m, GenerateRequest)] == ["a", "b"]
        with pytest.raises(ValueError, match="already in use"):
            await manager.submit(GenerateInput(text="x", rid="a"))
        with pytest.raises(ValueError, match="KV cache holds only"):
            await manager.submit(GenerateInput(input_ids=[7] * (TINY_POOL + 10)))
        done = FinishReason.at_length(2)
        core.emit([TokenOutput("b", [5], 1, 0, 0.01), TokenOutput("a", [5], 1, 0, 0.02)])
        core.emit(
            [TokenOutput("a", [6], 1, 0, 0.02, done), TokenOutput("b", [6], 1, 0, 0.01, done)]
        )
        await group.wait_finished()
        assert [s.output_ids for s in group.states] == [[5, 6], [5, 6]]
        assert manager.num_running == 0
        samples = parse_metrics(manager.metrics.render(None))
        assert metric(samples, "sglang:generation_tokens_total") == 4
        assert metric(samples, "sglang:num_requests_total") == 2
        assert metric(samples, "sglang:inter_token_latency_seconds_count") == 2

    asyncio.run(scenario())


def test_a_disconnect_aborts_and_the_engine_dying_fails_every_request(
    tiny_server_model: Path,
) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model)
        group = await manager.submit(GenerateInput(text="hello", rid="a"))
        other = await manager.submit(GenerateInput(text="there", rid="b"))
        manager.abort_unfinished(group)
        assert AbortRequest("a") in core.sent and not manager.abort("unknown")
        stats = asyncio.create_task(manager.stats())
        waiters = [asyncio.create_task(g.wait_finished()) for g in (group, other)]
        await asyncio.sleep(0)
        core.exit(EngineDeadError("the engine process exited (exit code -9)"))
        for waiter in [*waiters, stats]:
            with pytest.raises(EngineUnavailable, match="exit code -9") as info:
                await waiter
            assert info.value.status == 503
        assert not manager.ready
        with pytest.raises(EngineUnavailable, match="exit code -9"):
            await manager.submit(GenerateInput(text="x"))
        manager.shutdown()
        assert core.closed

    asyncio.run(scenario())


def test_control_calls_answer_or_time_out(tiny_server_model: Path) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model)
        flush = asyncio.create_task(manager.flush_cache())
        await asyncio.sleep(0)
        call = core.sent[-1]
        assert isinstance(call, ControlRequest) and isinstance(call.call, FlushCache)
        core.emit([ControlReply(call.call_id, True)])
        assert await flush
        group = await manager.submit(GenerateInput(text="hello"))
        assert not await manager.flush_cache()  # refused at once while a request runs
        manager.control_timeout_s = 0.05
        with pytest.raises(EngineUnavailable, match="did not answer GetStats"):
            await manager.stats()
        manager.stop_serving("the server is shutting down")
        assert AbortRequest(group.rids[0]) in core.sent
        with pytest.raises(EngineUnavailable, match="shutting down"):
            await group.wait_finished()
        with pytest.raises(EngineUnavailable, match="shutting down"):
            manager.check_ready()

    asyncio.run(scenario())


def test_a_full_server_refuses_new_requests_before_reading_them(tiny_server_model: Path) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model, max_running=2, max_queued=2)
        first = await manager.submit(GenerateInput(text="a", rid="a"))
        await manager.submit(GenerateInput(text=["b", "c"], rid=["b", "c"]))
        with pytest.raises(Overloaded, match="4 requests at most|at most 4") as full:
            await manager.submit(GenerateInput(text="d", sampling_params={"n": 2}))
        assert full.value.status == 503 and full.value.headers() == {"Retry-After": "1"}
        with pytest.raises(Overloaded):  # refused before validation: no work spent on it
            await manager.submit(GenerateInput(text=["x", 7], sampling_params=[{}, {}]))  # type: ignore[list-item]
        await manager.submit(GenerateInput(text="d"))  # the fourth fits
        with pytest.raises(Overloaded):
            await manager.submit(GenerateInput(text="e"))
        core.emit([TokenOutput("a", [5], 1, 0, 0.01, FinishReason.at_length(1))])
        await first.wait_finished()
        await manager.submit(GenerateInput(text="e"))  # room again
        assert len([m for m in core.sent if isinstance(m, GenerateRequest)]) == 5
        # More than even an idle server takes: a 400, since retrying cannot help.
        with pytest.raises(ValueError, match="5 requests"):
            await manager.submit(GenerateInput(text="f", sampling_params={"n": 5}))
        with pytest.raises(ValueError, match="5 requests"):  # counted, not only validated
            await manager.submit(GenerateInput(text="f", sampling_params={"n": 5.0}))

    asyncio.run(scenario())


def test_served_name_of() -> None:
    assert served_name_of("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name_of("/models/tiny-llama/") == "tiny-llama"
