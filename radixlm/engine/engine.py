"""The in-process Engine: SGLang's offline API over an engine core running in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from radixlm.core.messages import (
    AbortRequest,
    CheckInvariant,
    ControlCall,
    ControlReply,
    ControlRequest,
    FlushCache,
    GetStats,
    Message,
    TokenOutput,
)
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.engine.frontend import GenerateInput, RequestState, tokenize_input

_POLL_S = 0.5  # how often a waiting caller re-checks that the engine thread is alive


class EngineDeadError(RuntimeError):
    """The engine core stopped (it crashed or was shut down)."""


class _ToLoop:
    """Where the core thread puts one request's outputs for an asyncio caller: onto the call's
    queue in the caller's event loop, tagged with the request's index in the call."""

    __slots__ = ("loop", "queue", "index")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[tuple[int, Any]], index: int
    ) -> None:
        self.loop, self.queue, self.index = loop, q, index

    def put(self, item: TokenOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))


def _generate_input(call: dict[str, Any]) -> GenerateInput:
    """The arguments of a `generate` or `async_generate` call (their locals()) as the input."""
    args = {name: value for name, value in call.items() if name != "self"}
    return GenerateInput(text=args.pop("prompt"), **args)


class Engine:
    """Offline generation with SGLang's `Engine` shape: `generate`, `async_generate`,
    `flush_cache`, `shutdown`."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.args = EngineArgs(model_path=model_path, **kwargs)
        self.core = EngineCore(self.args)
        self.tokenizer = self.core.tokenizer
        self._inbox: queue.Queue[Message] = queue.Queue()
        # Each running request's outputs: a queue.Queue, or a _ToLoop for an asyncio caller.
        self._streams: dict[str, queue.Queue[TokenOutput | BaseException] | _ToLoop] = {}
        self._calls: dict[int, queue.Queue[Any]] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="radixlm-engine", daemon=True)
        self._thread.start()

    # ---- the core thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.core.run(self._receive, self._emit)
            self._error = EngineDeadError("the engine was shut down")
        except BaseException as e:  # surfaces in every caller instead of hanging them
            self._error = EngineDeadError(f"the engine core failed: {e!r}")
            self._error.__cause__ = e
        with self._lock:
            waiters = list(self._streams.values()) + list(self._calls.values())
        for q in waiters:
            q.put(self._error)

    def _receive(self, block: bool) -> list[Message]:
        msgs: list[Message] = []
        try:
            msgs.append(self._inbox.get(block=block))
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _emit(self, items: list[Any]) -> None:
        with self._lock:
            for item in items:
                if isinstance(item, TokenOutput):
                    q = self._streams.get(item.rid)
                else:
                    assert isinstance(item, ControlReply)
                    q = self._calls.pop(item.call_id, None)
                    item = item.value
                if q is not None:
                    q.put(item)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error

    def _control(self, call: ControlCall) -> Any:
        self._check_alive()
        q: queue.Queue[Any] = queue.Queue()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = q
        self._inbox.put(ControlRequest(call_id, call))
        value = self._wait(q)
        if isinstance(value, BaseException):
            raise value
        return value

    def _wait(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise self._error or EngineDeadError("the engine thread is gone") from None

    # ---- public API ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a batch (a list); stream=True yields dicts
        whose text and output_ids are cumulative. Bad input raises ValueError."""
        inp = _generate_input(locals())  # first: locals() is the call's arguments
        states = self._submit(inp, lambda _: queue.Queue())
        if stream:
            return self._stream(states)
        try:
            for s in states:
                while not s.finished:
                    self._next(s, block=True)
        finally:
            self._close(states)
        return self._result(inp, states)

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """`generate` for asyncio code, as SGLang's Engine has it: awaiting gives the output (a
        dict, or a list for a batch), or with stream=True an async iterator of cumulative dicts.
        The event loop is never blocked; leaving a stream early aborts its requests."""
        inp = _generate_input(locals())  # first: locals() is the call's arguments
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        states = self._submit(inp, lambda i: _ToLoop(loop, outputs, i))
        updates = self._async_updates(states, outputs)
        if stream:
            return self._async_stream(states, updates)
        async for _ in updates:
            pass
        return self._result(inp, states)

    @staticmethod
    def _result(
        inp: GenerateInput, states: list[RequestState]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The finished requests' dicts: a list for a batch, else the one dict."""
        outs = [s.to_dict() for s in states]
        return outs if inp.is_batch or len(outs) > 1 else outs[0]

    async def _async_updates(
        self, states: list[RequestState], outputs: asyncio.Queue[tuple[int, Any]]
    ) -> AsyncGenerator[list[int], None]:
        """Apply the requests' outputs as they arrive; yields the indices of the requests each
        round changed. Requests still running when this stops are aborted."""
        try:
            while not all(s.finished for s in states):
                try:
                    item = await asyncio.wait_for(outputs.get(), _POLL_S)
                except asyncio.TimeoutError:
                    if not self._thread.is_alive():
                        raise self._error or EngineDeadError("the engine thread is gone") from None
                    continue
                changed: set[int] = set()
                while True:  # this output, then whatever else has arrived
                    i, out = item
                    if isinstance(out, BaseException):
                        raise out
                    states[i].apply(out)
                    changed.add(i)
                    if outputs.empty():
                        break
                    item = outputs.get_nowait()
                yield sorted(changed)
        finally:
            self._close(states)

    async def _async_stream(
        self, states: list[RequestState], updates: AsyncGenerator[list[int], None]
    ) -> AsyncIterator[dict[str, Any]]:
        """Cumulative chunks, as `generate(stream=True)` yields them."""
        async with contextlib.aclosing(updates):
            async for changed in updates:
                for i in changed:
                    out = states[i].to_dict()
                    yield out if len(states) == 1 else {"index": i, **out}

    def _submit(
        self,
        inp: GenerateInput,
        inbox: Callable[[int], queue.Queue[TokenOutput | BaseException] | _ToLoop],
    ) -> list[RequestState]:
        """Tokenize and queue the requests; inbox(i) is where request i's outputs will go."""
        self._check_alive()
        cfg = self.core.scheduler.config
        reqs = tokenize_input(
            inp, self.tokenizer, self.core.model_config.vocab_size, cfg.context_len
        )
        states = [RequestState(r, self.tokenizer, inp.return_text_in_logprobs) for r in reqs]
        with self._lock:
            for r in reqs:
                if r.rid in self._streams:
                    raise ValueError(f"a request with rid {r.rid!r} is already running")
            for i, r in enumerate(reqs):
                self._streams[r.rid] = inbox(i)
        for r in reqs:
            self._inbox.put(r)
        return states

    def _next(self, state: RequestState, block: bool) -> bool:
        """Apply the request's next output; False if none is queued (only when not blocking)."""
        q = self._streams[state.req.rid]
        assert isinstance(q, queue.Queue), "a request of an asyncio caller"
        try:
            item = self._wait(q) if block else q.get_nowait()
        except queue.Empty:
            return False
        if isinstance(item, BaseException):
            raise item
        state.apply(item)
        return True

    def _stream(self, states: list[RequestState]) -> Iterator[dict[str, Any]]:
        try:
            pending = list(states)
            while pending:
                progressed = False
                for i, s in enumerate(states):
                    if s.finished:
                        continue
                    got = self._next(s, block=len(states) == 1)
                    while not s.finished and self._next(s, block=False):
                        pass
                    if got:
                        progressed = True
                        out = s.to_dict()
                        yield out if len(states) == 1 else {"index": i, **out}
                    if s.finished:
                        pending.remove(s)
                if not progressed:
                    self._check_alive()
                    time.sleep(0.001)
        finally:
            self._close(states)

    def _close(self, states: list[RequestState]) -> None:
        for s in states:
            if not s.finished:
                self._inbox.put(AbortRequest(s.req.rid))
        with self._lock:
            for s in states:
                self._streams.pop(s.req.rid, None)

    def abort_request(self, rid: str) -> None:
        """Abort a running request by its rid."""
        self._inbox.put(AbortRequest(rid))

    def flush_cache(self) -> bool:
        """Drop the radix cache; False (nothing changes) while requests are running."""
        return bool(self._control(FlushCache()))

    def get_stats(self) -> dict[str, Any]:
        """Scheduler and cache counters."""
        return dataclasses.asdict(self._control(GetStats()))

    def check_invariant(self) -> None:
        """Raise AssertionError unless every KV slot has exactly one owner (for tests)."""
        self._control(CheckInvariant())

    def get_server_info(self) -> dict[str, Any]:
        """The resolved arguments plus live statistics."""
        return {**self.args.to_dict(), "model_path": self.core.model_path, **self.get_stats()}

    def shutdown(self) -> None:
        """Stop the core thread; pending calls fail with EngineDeadError."""
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
