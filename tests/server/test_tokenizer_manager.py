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
from radixlm.server.args import ServerArgs
from radixlm.server.errors import EngineUnavailable, Overloaded
from radixlm.server.tokenizer_manager import TokenizerManager, served_name_of
from radixlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def doomed(start_tiny_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server of its own that does not restart its engine: this module kills it."""
    srv = start_tiny_server("--max-engine-restarts", "0")
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
        events = []
        with doomed.client() as c, c.stream("POST", "/v1/chat/completions", json=chat) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chat_event.set()
        results["chat"] = events

    first_chat_event = threading.Event()
    threads = [threading.Thread(target=f) for f in (streaming, waiting, chat_stream)]
    for t in threads:
        t.start()
    # Both streams in flight before the engine dies (a request that arrives after it gets a
    # plain 503, tested below).
    assert first_event.wait(60) and first_chat_event.wait(60)
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


def test_a_killed_engine_restarts_and_serves_the_requests_it_had_queued(
    start_tiny_server: Callable[..., ServerProcess],
) -> None:
    srv = start_tiny_server("--max-running-requests", "1")
    try:
        with srv.client() as c:
            assert c.get("/health").status_code == 200
        engine = srv.engine_pid()
        results: dict[str, Any] = {}
        first_event = threading.Event()
        long = {"max_new_tokens": 1800, "ignore_eos": True}

        def streaming() -> None:
            body = {"text": "Run until killed", "sampling_params": long, "stream": True}
            with srv.client() as c, c.stream("POST", "/generate", json=body) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_event.set()
            results["stream"] = events

        def queued() -> None:  # waits behind the stream (one running request at most)
            body = {"text": "Wait your turn", "sampling_params": {"max_new_tokens": 8}}
            with srv.client() as c:
                results["queued"] = c.post("/generate", json=body)

        threads = [threading.Thread(target=streaming)]
        threads[0].start()
        assert first_event.wait(60)
        threads.append(threading.Thread(target=queued))
        threads[1].start()
        with srv.client() as c:
            deadline = time.monotonic() + 30
            while c.get("/server_info").json()["internal_states"][0]["num_queue_reqs"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)
            os.kill(engine, signal.SIGKILL)
            for expected in (503, 200):  # down while it restarts, then up
                while (status := c.get("/health").status_code) != expected:
                    assert time.monotonic() < deadline + 120, f"/health stays {status}"
                    time.sleep(0.05)
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a request hangs across the restart"

        error = json.loads(results["stream"][-2])["error"]  # it had streamed: it fails
        assert error["code"] == 503 and "exit code -9" in error["message"]
        answer = results["queued"]  # it had not started: it ran on the new engine
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta_info"]["completion_tokens"] == 8
        assert srv.engine_pid() != engine
        with srv.client() as c:
            samples = parse_metrics(c.get("/metrics").text)
            assert metric(samples, "sglang:engine_restarts_total") == 1
            assert c.get("/internal/check_invariant").json() == {"ok": True}
            assert c.post("/generate", json={"text": "again"}).status_code == 200
    finally:
        srv.stop()


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
    model: Path, max_running: int = 256, **server: Any
) -> tuple[TokenizerManager, FakeTransport]:
    """A manager serving from a fake core (call on the event loop); a restarted engine is
    another fake core, in `manager.restarted` (a launch in `manager.failing_launches` fails)."""
    tok = Tokenizer.load(str(model))
    info = fake_info(model, tok, max_running)
    restarted: list[FakeTransport] = []
    failing: list[str] = []

    def launch() -> tuple[FakeTransport, CoreInfo, Tokenizer]:
        if failing:
            raise RuntimeError(failing.pop())
        restarted.append(FakeTransport())
        return restarted[-1], info, tok

    manager = TokenizerManager(EngineArgs(model_path=str(model)), ServerArgs(**server), launch)
    manager.restarted, manager.failing_launches = restarted, failing  # type: ignore[attr-defined]
    with pytest.raises(EngineUnavailable, match="starting"):
        manager.check_ready()
    transport = FakeTransport()
    manager.attach(transport, info, tok)
    assert manager.ready
    return manager, transport


def fake_info(model: Path, tok: Tokenizer, max_running: int) -> CoreInfo:
    """What a fake core says it serves."""
    return CoreInfo(
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
        manager, core = attached(tiny_server_model, max_engine_restarts=0)
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
        manager, core = attached(tiny_server_model, max_running=2, max_queued_requests=2)
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


async def wait_for(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Let the loop run until condition() holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def generate_rids(core: FakeTransport) -> list[str]:
    """The rids of the requests a fake core was sent, in order."""
    return [m.rid for m in core.sent if isinstance(m, GenerateRequest)]


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts after 10 ms, 20 ms, ... instead of half a second and more."""
    monkeypatch.setattr("radixlm.server.engine_launch.RESTART_BACKOFF_S", 0.01)


@pytest.mark.usefixtures("quick_backoff")
def test_a_dead_engine_restarts_and_runs_the_requests_it_had_not_started(
    tiny_server_model: Path,
) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model)
        streaming = await manager.submit(GenerateInput(text="hello", rid="a", stream=True))
        queued = await manager.submit(GenerateInput(text=["one", "two"], rid=["b", "c"]))
        # a's client has seen its output; b's waits for the whole answer: it has seen nothing.
        core.emit([TokenOutput("a", [5], 1, 0, 0.01), TokenOutput("b", [6], 1, 0, 0.01)])
        await wait_for(lambda: streaming.states[0].output_ids and queued.states[0].output_ids)
        core.exit(EngineDeadError("the engine process exited (exit code -9)"))
        with pytest.raises(EngineUnavailable, match="exit code -9"):
            await streaming.wait_finished()
        await wait_for(lambda: manager.restarted)  # a new engine, after the backoff
        new_core = manager.restarted[0]  # type: ignore[attr-defined]
        assert manager.ready and generate_rids(new_core) == ["b", "c"]
        assert manager.num_running == 2
        done = FinishReason.at_length(1)
        new_core.emit(
            [TokenOutput("b", [7], 1, 0, 0.01, done), TokenOutput("c", [8], 1, 0, 0.01, done)]
        )
        await queued.wait_finished()
        assert [s.output_ids for s in queued.states] == [[7], [8]]  # b started over
        samples = parse_metrics(manager.metrics.render(None))
        assert metric(samples, "sglang:engine_restarts_total") == 1
        await manager.submit(GenerateInput(text="after", rid="d"))
        assert generate_rids(new_core) == ["b", "c", "d"]
        manager.shutdown()

    asyncio.run(scenario())


def test_while_the_engine_restarts_new_requests_get_503_and_held_ones_can_be_aborted(
    tiny_server_model: Path,
) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model)
        left = await manager.submit(GenerateInput(text="hello", rid="a"))
        aborted = await manager.submit(GenerateInput(text="there", rid="b"))
        core.exit(EngineDeadError("the engine process exited (exit code -9)"))
        await wait_for(lambda: manager.num_running == 2 and not manager.ready)
        with pytest.raises(EngineUnavailable, match="restarting") as down:
            await manager.submit(GenerateInput(text="x"))
        assert down.value.headers() == {"Retry-After": "2"}
        manager.abort_unfinished(left)  # its client went away
        assert manager.abort("b")
        await aborted.wait_finished()
        assert aborted.states[0].finish_reason is not None
        assert aborted.states[0].finish_reason.is_abort
        assert manager.num_running == 0
        await wait_for(lambda: manager.ready, timeout_s=5)  # the 0.5 s backoff
        assert generate_rids(manager.restarted[0]) == []  # type: ignore[attr-defined]
        manager.shutdown()

    asyncio.run(scenario())


@pytest.mark.usefixtures("quick_backoff")
def test_restarts_are_bounded_and_a_failed_restart_counts(tiny_server_model: Path) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model, max_engine_restarts=2)
        manager.failing_launches.append("no memory left")  # type: ignore[attr-defined]
        waiting = await manager.submit(GenerateInput(text="hello", rid="a"))
        core.exit(EngineDeadError("the engine process exited (exit code -9)"))
        # The first restart fails, the second (the last allowed) starts an engine.
        await wait_for(lambda: manager.restarted)
        second = manager.restarted[0]  # type: ignore[attr-defined]
        assert manager.ready and generate_rids(second) == ["a"]
        second.exit(EngineDeadError("the engine process exited (exit code -11)"))
        with pytest.raises(EngineUnavailable, match="stays down") as down:
            await waiting.wait_finished()
        assert "exit code -11" in str(down.value) and "restarted 2 times" in str(down.value)
        await asyncio.sleep(0.1)
        assert len(manager.restarted) == 1  # type: ignore[attr-defined]
        with pytest.raises(EngineUnavailable, match="stays down"):
            manager.check_ready()
        samples = parse_metrics(manager.metrics.render(None))
        assert metric(samples, "sglang:engine_restarts_total") == 1
        manager.shutdown()

    asyncio.run(scenario())


def test_queued_prompt_tokens_are_bounded(tiny_server_model: Path) -> None:
    async def scenario() -> None:
        manager, core = attached(tiny_server_model, max_queued_tokens=50)
        big = await manager.submit(GenerateInput(input_ids=[7] * 60, rid="big"))  # alone: fits
        with pytest.raises(Overloaded, match="max-queued-tokens") as full:
            await manager.submit(GenerateInput(input_ids=[7] * 2))
        assert full.value.headers() == {"Retry-After": "1"}
        core.emit([TokenOutput("big", [5], 60, 0, 0.01, FinishReason.at_length(1))])
        await big.wait_finished()
        assert manager.num_prompt_tokens == 0
        await manager.submit(GenerateInput(input_ids=[7] * 30, rid="a"))
        with pytest.raises(Overloaded, match="30 prompt tokens"):
            await manager.submit(GenerateInput(input_ids=[7] * 21, rid="b"))
        await manager.submit(GenerateInput(input_ids=[7] * 20, rid="c"))  # 50: at the bound
        assert manager.num_prompt_tokens == 50
        assert generate_rids(core) == ["big", "a", "c"]

    asyncio.run(scenario())
