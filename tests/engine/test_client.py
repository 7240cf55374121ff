"""The engine client over fake transports (no model): routing, control calls, aborts, and the
core's end; then both real transports over a fake core loop and a fake engine process."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from radixlm.core.finish import FinishReason
from radixlm.core.messages import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    FlushCache,
    GenerateRequest,
    GetStats,
    Message,
    TokenOutput,
)
from radixlm.core.params import SamplingParams
from radixlm.engine.client import (
    EngineClient,
    EngineDeadError,
    LoopInbox,
    Output,
    RequestGroup,
)
from radixlm.engine.frontend import RequestState
from radixlm.engine.transport import ProcessTransport, ThreadTransport
from radixlm.tokenizer import Tokenizer

OnOutputs = Callable[[list[TokenOutput | ControlReply]], None]
OnExit = Callable[[EngineDeadError], None]


class FakeTransport:
    """A transport whose core is the test: it reads what was sent and emits by hand."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closed = False

    def start(self, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        self.emit, self.exit = on_outputs, on_exit

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True


def req(rid: str, ids: tuple[int, ...] = (1, 2)) -> GenerateRequest:
    return GenerateRequest(rid, list(ids), SamplingParams(max_new_tokens=4))


def out(rid: str, ids: list[int], done: bool = False) -> TokenOutput:
    finish = FinishReason.at_length(len(ids)) if done else None
    return TokenOutput(rid, ids, 2, 0, finish_reason=finish)


def aborts(t: FakeTransport) -> list[str]:
    return [m.rid for m in t.sent if isinstance(m, AbortRequest)]


@pytest.fixture
def fake() -> tuple[EngineClient, FakeTransport]:
    t = FakeTransport()
    return EngineClient(t), t


def test_outputs_reach_their_request_and_a_finished_rid_is_free_again(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: dict[str, list[Output]] = {"a": [], "b": []}
    client.submit([req("a"), req("b")], [got["a"].append, got["b"].append])
    assert [m.rid for m in t.sent if isinstance(m, GenerateRequest)] == ["a", "b"]
    assert client.num_running == 2
    t.emit([out("b", [7]), out("a", [5]), out("a", [6], done=True), out("gone", [1])])
    assert [o.new_ids for o in got["a"] if isinstance(o, TokenOutput)] == [[5], [6]]
    assert [o.new_ids for o in got["b"] if isinstance(o, TokenOutput)] == [[7]]
    assert client.num_running == 1
    client.submit([req("a")], [got["a"].append])  # a finished request's rid can be reused


def test_submit_is_all_or_nothing(fake: tuple[EngineClient, FakeTransport]) -> None:
    client, t = fake
    client.submit([req("a")], [print])
    for batch in ([req("b"), req("a")], [req("c"), req("c")]):
        with pytest.raises(ValueError, match="already in use"):
            client.submit(batch, [print, print])
    assert len(t.sent) == 1 and client.num_running == 1


def test_close_aborts_what_still_runs_and_stops_its_outputs(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: list[Output] = []
    client.submit([req("a"), req("b")], [got.append, got.append])
    t.emit([out("a", [5], done=True)])
    client.close(["a", "b"])
    assert aborts(t) == ["b"]  # a had ended
    t.emit([out("b", [6], done=True)])
    assert len(got) == 1 and client.num_running == 0


def test_prompt_tokens_in_flight_are_counted_until_each_request_ends(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    client.submit([req("a", (1, 2, 3)), req("b"), req("c", (4,))], [print, print, print])
    assert client.num_prompt_tokens == 6
    t.emit([out("a", [5], done=True)])
    client.close(["b"])
    assert client.num_prompt_tokens == 1
    t.exit(EngineDeadError("gone"))
    assert client.num_prompt_tokens == 0


def test_on_lost_hears_of_a_core_that_ended_by_itself_once_and_first() -> None:
    heard: list[str] = []
    t = FakeTransport()
    client = EngineClient(t, lambda e: heard.append(f"lost: {e}"))
    client.submit([req("a")], [lambda o: heard.append(f"a: {o}")])
    t.exit(EngineDeadError("crashed"))
    t.exit(EngineDeadError("crashed again"))  # the reader and the sender thread both report
    assert heard == ["lost: crashed", "a: crashed"]
    stopped = FakeTransport()
    client = EngineClient(stopped, lambda e: heard.append(f"lost: {e}"))
    client.shutdown()  # a core stopped on purpose is not lost
    stopped.exit(EngineDeadError("the engine was shut down"))
    assert heard == ["lost: crashed", "a: crashed"]


def test_abort_keeps_routing_until_the_last_output(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: list[Output] = []
    client.submit([req("a"), req("b")], [got.append, got.append])
    assert client.abort("a") and not client.abort("unknown")
    assert client.abort_all() == 2
    assert aborts(t) == ["a", "a", "b"]
    t.emit([TokenOutput("a", [], 2, 0, finish_reason=FinishReason.abort("aborted"))])
    assert isinstance(got[-1], TokenOutput) and got[-1].finished
    assert client.num_running == 1


def test_control_calls_are_answered_by_call_id(fake: tuple[EngineClient, FakeTransport]) -> None:
    client, t = fake
    answers: list[object] = []
    first = client.call(GetStats(), answers.append)
    second = client.call(FlushCache(), answers.append)
    sent = [m for m in t.sent if isinstance(m, ControlRequest)]
    assert [m.call_id for m in sent] == [first, second] and first != second
    t.emit([ControlReply(second, False), ControlReply(first, "stats"), ControlReply(first, 1)])
    assert answers == [False, "stats"]  # a second answer to one call goes nowhere

    def answer_later(value: object) -> None:
        call = next(m for m in reversed(t.sent) if isinstance(m, ControlRequest))
        t.emit([ControlReply(call.call_id, value)])

    for value, expect in ((True, None), (AssertionError("two owners"), AssertionError)):
        timer = threading.Timer(0.05, answer_later, (value,))
        timer.start()
        if expect is None:
            assert client.control(FlushCache(), timeout_s=10) is True
        else:
            with pytest.raises(expect, match="two owners"):
                client.control(FlushCache(), timeout_s=10)
        timer.join()


def test_a_control_call_that_times_out_is_forgotten(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    with pytest.raises(TimeoutError, match="did not answer FlushCache"):
        client.control(FlushCache(), timeout_s=0.01)
    call = next(m for m in t.sent if isinstance(m, ControlRequest))
    t.emit([ControlReply(call.call_id, True)])  # too late: dropped

    async def main() -> None:
        with pytest.raises(TimeoutError, match="did not answer GetStats"):
            await client.control_async(GetStats(), timeout_s=0.01)

    asyncio.run(main())


def test_the_core_ending_fails_every_waiter_once_and_refuses_new_work(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: list[Output] = []
    answers: list[object] = []
    client.submit([req("a"), req("b")], [got.append, got.append])
    client.call(GetStats(), answers.append)
    t.exit(EngineDeadError("the engine process exited (exit code -9)"))
    t.exit(EngineDeadError("a second reason"))
    assert [str(e) for e in [*got, *answers]] == ["the engine process exited (exit code -9)"] * 3
    assert client.num_running == 0 and str(client.error).startswith("the engine process exited")
    with pytest.raises(EngineDeadError, match="exit code"):
        client.submit([req("c")], [got.append])
    with pytest.raises(EngineDeadError):
        client.call(GetStats(), answers.append)
    assert not client.abort("a") and client.abort_all() == 0
    t.emit([out("a", [5], done=True)])  # late outputs go nowhere
    assert len(got) == 2


def test_stop_aborts_running_requests_and_shutdown_closes_the_transport(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: list[Output] = []
    client.submit([req("a"), req("b")], [got.append, got.append])
    t.emit([out("a", [5], done=True)])
    client.shutdown("the server is shutting down")
    assert aborts(t) == ["b"] and t.closed
    assert [str(o) for o in got if isinstance(o, EngineDeadError)] == [
        "the server is shutting down"
    ]


def test_a_failing_sink_loses_only_its_own_output(
    fake: tuple[EngineClient, FakeTransport],
) -> None:
    client, t = fake
    got: list[Output] = []

    def broken(_: Output) -> None:
        raise RuntimeError("consumer bug")

    client.submit([req("a"), req("b")], [broken, got.append])
    t.emit([out("a", [5]), out("b", [6], done=True)])
    assert len(got) == 1


# ---- the asyncio side ----------------------------------------------------------------------


def test_loop_inbox_runs_posts_from_threads_in_order_in_one_wake_up() -> None:
    async def main() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        inbox = LoopInbox(loop)
        seen: list[int] = []
        sizes: list[int] = []

        def poster() -> None:
            for i in range(50):
                inbox.post(seen.append, i)

        thread = threading.Thread(target=poster)
        thread.start()  # the loop is busy in join(): every post waits for one wake-up
        thread.join()
        sizes.append(len(seen))
        await asyncio.sleep(0)
        sizes.append(len(seen))
        return seen, sizes

    seen, sizes = asyncio.run(main())
    assert seen == list(range(50)) and sizes == [0, 50]


def test_loop_inbox_drops_posts_to_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    assert not LoopInbox(loop).post(print, "never")


def test_request_group_coalesces_updates_and_reports_failure(tiny_model_dir: Path) -> None:
    tok = Tokenizer.load(str(tiny_model_dir))
    reqs = [req(f"r{i}") for i in range(2)]

    async def scenario() -> None:
        group = RequestGroup([RequestState(r, tok) for r in reqs], is_batch=True)
        assert group.rids == ["r0", "r1"]
        for i in (1, 0, 1):  # three outputs before the consumer looks: one update
            group.take(i, out(f"r{i}", [5]))
        assert await group.updates() == [0, 1]
        waiter = asyncio.create_task(group.updates())
        await asyncio.sleep(0)
        group.fail(EngineDeadError("gone"))
        with pytest.raises(EngineDeadError, match="gone"):
            await waiter
        assert not group.finished

    asyncio.run(scenario())


# ---- the transports ------------------------------------------------------------------------


def echo_core(receive: Callable[[bool], list[Message]], emit: Callable[[list[Any]], None]) -> None:
    """A core loop that ends each request at once with its prompt as output."""
    while True:
        for msg in receive(True):
            if msg is None:
                return
            if isinstance(msg, GenerateRequest):
                emit([out(msg.rid, msg.input_ids, done=True)])
            elif isinstance(msg, ControlRequest):
                if isinstance(msg.call, GetStats):
                    raise RuntimeError("the core broke")
                emit([ControlReply(msg.call_id, True)])


def test_thread_transport_runs_the_core_loop_and_reports_its_failure() -> None:
    client = EngineClient(ThreadTransport(echo_core))
    outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
    client.submit([req("a", (3, 4))], [outputs.put])
    first = outputs.get(timeout=10)
    assert isinstance(first, TokenOutput) and first.new_ids == [3, 4]
    assert client.control(FlushCache(), timeout_s=10) is True
    with pytest.raises(EngineDeadError, match="the core broke") as info:
        client.control(GetStats(), timeout_s=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(EngineDeadError):
        client.submit([req("b")], [outputs.put])
    client.shutdown()


def test_thread_transport_shutdown_ends_waiters() -> None:
    client = EngineClient(ThreadTransport(echo_core))
    client.shutdown()
    assert str(client.error) == "the engine was shut down"
    with pytest.raises(EngineDeadError, match="shut down"):
        client.control(FlushCache(), timeout_s=10)


class FakeProcess:
    """The parts of multiprocessing.Process that the process transport reads."""

    exitcode: int | None = None

    def join(self, timeout: float | None = None) -> None:
        self.exitcode = -9


class FakeEngineProcess:
    """An EngineProcess whose pipe is a queue: the test puts output batches, or EOFError."""

    def __init__(self) -> None:
        self.process = FakeProcess()
        self.sent: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.outputs: queue.SimpleQueue[list[Any] | BaseException] = queue.SimpleQueue()
        self.broken = False
        self.shut_down = False

    def send(self, msg: Message) -> None:
        if self.broken:
            raise BrokenPipeError
        self.sent.put(msg)

    def recv(self) -> list[Any]:
        item = self.outputs.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def shutdown(self) -> None:
        self.shut_down = True
        self.outputs.put(EOFError())


def test_process_transport_sends_and_reads_on_its_threads() -> None:
    engine = FakeEngineProcess()
    client = EngineClient(ProcessTransport(engine))  # type: ignore[arg-type]
    outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
    client.submit([req("a")], [outputs.put])
    sent = engine.sent.get(timeout=10)
    assert isinstance(sent, GenerateRequest) and sent.rid == "a"
    engine.outputs.put([out("a", [5]), out("a", [6], done=True)])
    got = [outputs.get(timeout=10), outputs.get(timeout=10)]
    assert [o.new_ids for o in got if isinstance(o, TokenOutput)] == [[5], [6]]
    client.submit([req("b")], [outputs.put])
    engine.outputs.put(EOFError())  # the process died
    dead = outputs.get(timeout=10)
    assert isinstance(dead, EngineDeadError) and "exit code -9" in str(dead)
    client.shutdown()
    assert engine.shut_down


def test_process_transport_reports_a_broken_pipe() -> None:
    engine = FakeEngineProcess()
    engine.broken = True
    client = EngineClient(ProcessTransport(engine))  # type: ignore[arg-type]
    outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
    client.submit([req("a")], [outputs.put])
    dead = outputs.get(timeout=10)
    # The send noticed first; it names the exit code as the reader would.
    assert isinstance(dead, EngineDeadError) and "exited (exit code -9)" in str(dead)
    client.shutdown()
