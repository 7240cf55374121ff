"""The one engine client: the frontend's side of an engine core, whatever carries the messages.

`EngineClient` routes each request's outputs by rid, answers control calls by call id, aborts
what its caller leaves, and fails every waiter when the core is gone. A `Transport` carries the
messages: the core on a thread of this process (the in-process `Engine`) or in its own process
(the server); see radixlm/engine/transport.py. Outputs reach their consumer through a sink: a
queue for a thread that blocks, a `LoopInbox` for asyncio code, which never blocks on the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from radixlm.core.messages import (
    AbortRequest,
    ControlCall,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    Message,
    TokenOutput,
)
from radixlm.engine.frontend import RequestState

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone (it crashed or was shut down), or its client was stopped."""


Output = TokenOutput | EngineDeadError
# Where one request's outputs go, its last one finished (or an EngineDeadError). Called on the
# transport's thread, so it must return at once: put on a queue, or post to an event loop.
Sink = Callable[[Output], object]
# Where a control call's answer goes: its value, the exception it raised, or an EngineDeadError.
Reply = Callable[[object], object]


class Transport(Protocol):
    """Carries messages to one engine core and its outputs back (a thread or a process)."""

    def start(
        self,
        on_outputs: Callable[[list[TokenOutput | ControlReply]], None],
        on_exit: Callable[[EngineDeadError], None],
    ) -> None:
        """Begin: each batch of the core's outputs goes to on_outputs, in order and from one
        thread; on_exit is called once, with why, when the core is gone."""

    def send(self, msg: Message) -> None:
        """Queue a message for the core, in order. It must not block on the core nor call
        on_outputs or on_exit itself (the client sends under its lock); a gone core is not an
        error here: on_exit reports it."""

    def close(self) -> None:
        """Stop the core and wait a bounded time for it to end; idempotent."""


class EngineClient:
    """Requests and control calls over one transport; thread-safe.

    Invariant: every registered sink and reply gets exactly one last item, its request's finished
    output, the call's answer, or the EngineDeadError of the core's end, unless its caller closes
    it first; so a waiter never needs to poll whether the core is still alive.
    """

    def __init__(
        self, transport: Transport, on_lost: Callable[[EngineDeadError], object] | None = None
    ) -> None:
        self._transport = transport
        # Told why, before any waiter, when the core ends by itself (not by stop or shutdown).
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._streams: dict[str, Sink] = {}
        self._prompt_lens: dict[str, int] = {}
        self._prompt_tokens = 0
        self._calls: dict[int, Reply] = {}
        self._call_ids = itertools.count()
        self._error: EngineDeadError | None = None
        transport.start(self._route, self._lost)

    @property
    def error(self) -> EngineDeadError | None:
        """Why the core can no longer serve; None while it can."""
        return self._error

    def check_alive(self) -> None:
        """Raise EngineDeadError once the core is gone."""
        if self._error is not None:
            raise self._error

    @property
    def num_running(self) -> int:
        """Requests sent whose last output has not arrived."""
        return len(self._streams)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the requests sent whose last output has not arrived."""
        return self._prompt_tokens

    # ---- requests --------------------------------------------------------------------------

    def submit(self, reqs: Sequence[GenerateRequest], sinks: Sequence[Sink]) -> None:
        """Send requests, each one's outputs to the matching sink; all or nothing. ValueError if a
        rid is already running, EngineDeadError if the core is gone."""
        assert len(reqs) == len(sinks)
        with self._lock:
            self.check_alive()
            rids: set[str] = set()
            for r in reqs:
                if r.rid in self._streams or r.rid in rids:
                    raise ValueError(f"rid {r.rid!r} is already in use by a running request")
                rids.add(r.rid)
            # Sent under the lock, so that an abort from another thread never overtakes its request.
            for r, sink in zip(reqs, sinks, strict=True):
                self._streams[r.rid] = sink
                self._prompt_lens[r.rid] = len(r.input_ids)
                self._prompt_tokens += len(r.input_ids)
                self._transport.send(r)

    def abort(self, rid: str) -> bool:
        """Ask the core to end a running request (its last output, reason abort, still comes);
        False if no request rid is running."""
        with self._lock:
            if rid not in self._streams or self._error is not None:
                return False
            self._transport.send(AbortRequest(rid))
        return True

    def abort_all(self) -> int:
        """Abort every running request; how many."""
        with self._lock:
            if self._error is not None:
                return 0
            for rid in self._streams:
                self._transport.send(AbortRequest(rid))
            return len(self._streams)

    def close(self, rids: Iterable[str]) -> None:
        """Stop routing these requests' outputs; those still running are aborted (their caller
        left). The rids are free again at once."""
        with self._lock:
            for rid in rids:
                if self._pop(rid) is not None and self._error is None:
                    self._transport.send(AbortRequest(rid))

    def _pop(self, rid: str) -> Sink | None:
        # Under the lock: the request's outputs go nowhere from now on.
        sink = self._streams.pop(rid, None)
        if sink is not None:
            self._prompt_tokens -= self._prompt_lens.pop(rid)
        return sink

    # ---- control calls ---------------------------------------------------------------------

    def call(self, call: ControlCall, reply: Reply) -> int:
        """Send a control call whose answer goes to reply; its call id (for forget).
        EngineDeadError if the core is gone."""
        with self._lock:
            self.check_alive()
            call_id = next(self._call_ids)
            self._calls[call_id] = reply
            self._transport.send(ControlRequest(call_id, call))
        return call_id

    def forget(self, call_id: int) -> None:
        """Drop a call's reply (its caller stopped waiting)."""
        with self._lock:
            self._calls.pop(call_id, None)

    def control(self, call: ControlCall, timeout_s: float | None = None) -> object:
        """A blocking control call: its value; raises what the call raised, EngineDeadError, or
        TimeoutError after timeout_s."""
        answers: queue.SimpleQueue[object] = queue.SimpleQueue()
        call_id = self.call(call, answers.put)
        try:
            value = answers.get(timeout=timeout_s)
        except queue.Empty:
            self.forget(call_id)
            raise _timeout(call, timeout_s) from None
        if isinstance(value, BaseException):
            raise value
        return value

    async def control_async(self, call: ControlCall, timeout_s: float | None = None) -> object:
        """`control` for asyncio code: the event loop waits without blocking."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[object] = loop.create_future()
        inbox = LoopInbox(loop)
        call_id = self.call(call, lambda value: inbox.post(_settle, answer, value))
        try:
            value = await asyncio.wait_for(answer, timeout_s)
        except asyncio.TimeoutError:
            self.forget(call_id)
            raise _timeout(call, timeout_s) from None
        if isinstance(value, BaseException):
            raise value
        return value

    # ---- the end ---------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Refuse new work and end every waiter with EngineDeadError(reason); requests still
        running are aborted in the core, which runs on until shutdown."""
        self._fail(EngineDeadError(reason), abort=True)

    def shutdown(self, reason: str = "the engine was shut down") -> None:
        """`stop`, then stop the core and wait for it."""
        self.stop(reason)
        self._transport.close()

    # ---- the transport's thread ------------------------------------------------------------

    def _route(self, items: list[TokenOutput | ControlReply]) -> None:
        deliveries: list[tuple[Callable[[Any], object], object]] = []
        with self._lock:
            for item in items:
                if isinstance(item, ControlReply):
                    reply = self._calls.pop(item.call_id, None)
                    if reply is not None:
                        deliveries.append((reply, item.value))
                    continue
                # A finished request's rid is free for a new request from now on.
                sink = self._pop(item.rid) if item.finished else self._streams.get(item.rid)
                if sink is not None:  # else its caller closed it
                    deliveries.append((sink, item))
        for deliver, value in deliveries:
            _deliver(deliver, value)

    def _lost(self, error: EngineDeadError) -> None:
        # The transport's report that the core ended: unless the client was stopped first, tell
        # on_lost before any waiter hears of it.
        with self._lock:
            on_lost, self._on_lost = self._on_lost, None  # once, though two threads may report
            if self._error is not None:
                on_lost = None
        if on_lost is not None:
            _deliver(on_lost, error)
        self._fail(error)

    def _fail(self, error: EngineDeadError, abort: bool = False) -> None:
        with self._lock:
            if self._error is not None:  # the first reason is the one waiters see
                return
            self._error = error
            if abort:
                for rid in self._streams:
                    self._transport.send(AbortRequest(rid))
            waiters: list[Callable[[Any], object]] = [
                *self._streams.values(),
                *self._calls.values(),
            ]
            self._streams.clear()
            self._prompt_lens.clear()
            self._prompt_tokens = 0
            self._calls.clear()
        for deliver in waiters:
            _deliver(deliver, error)


def _deliver(deliver: Callable[[Any], object], value: object) -> None:
    # A broken consumer loses its own output, never the transport's thread (and so every other).
    try:
        deliver(value)
    except Exception:
        logger.exception("a consumer of engine outputs failed")


def _timeout(call: ControlCall, timeout_s: float | None) -> TimeoutError:
    return TimeoutError(f"the engine did not answer {type(call).__name__} in {timeout_s:.0f}s")


def _settle(answer: asyncio.Future[object], value: object) -> None:
    if not answer.done():  # it timed out
        answer.set_result(value)


class LoopInbox:
    """Calls from other threads run on one event loop, in order; those posted before the loop
    gets to them run in one wake-up (one per output batch, not one per output)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def post(self, fn: Callable[..., object], *args: Any) -> bool:
        """Run fn(*args) on the loop soon; False (and dropped) if the loop is closed."""
        with self._lock:
            self._pending.append((fn, args))
            if len(self._pending) > 1:  # a wake-up is already on its way
                return True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: nobody is left to take it
            with self._lock:
                self._pending.clear()
            return False
        return True

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args in pending:
            try:
                fn(*args)
            except Exception:  # the others posted with it must still run
                logger.exception("a call posted to the event loop failed")


@dataclass(eq=False)
class RequestGroup:
    """The engine requests of one call (a batch, n samples) for an asyncio consumer: outputs are
    applied on the loop as they arrive, and the consumer awaits `updates`."""

    states: list[RequestState]
    is_batch: bool
    stream: bool = False  # the consumer sees outputs as they come, not only the finished ones
    error: BaseException | None = None
    _dirty: set[int] = field(default_factory=set, init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def finished(self) -> bool:
        """Whether every request has its last output."""
        return all(s.finished for s in self.states)

    @property
    def rids(self) -> list[str]:
        """The requests' ids, in the order of the answer."""
        return [s.req.rid for s in self.states]

    def take(self, index: int, out: TokenOutput) -> None:
        """Apply request `index`'s output (on the loop)."""
        self.states[index].apply(out)
        self.notify(index)

    def notify(self, index: int) -> None:
        """Request `index` took in an output (called on the loop)."""
        self._dirty.add(index)
        self._changed.set()

    def fail(self, error: BaseException) -> None:
        """End the wait of whoever consumes this group with `error`."""
        self.error = error
        self._changed.set()

    async def updates(self) -> list[int]:
        """Wait for news; the indices of the requests that changed since the last call.

        Outputs that arrive while the consumer is busy coalesce into one update, so a slow client
        gets fewer, larger steps instead of a growing backlog. Raises the group's error when the
        requests cannot finish.
        """
        while not self._dirty:
            if self.error is not None:
                raise self.error
            self._changed.clear()
            await self._changed.wait()
        changed = sorted(self._dirty)
        self._dirty.clear()
        return changed

    async def wait_finished(self) -> None:
        """Wait until every request ended (raises the group's error)."""
        while not self.finished:
            await self.updates()
