"""The HTTP side's bridge to the engine process: tokenize, submit, route outputs back, abort.

Everything here runs on the event loop except two threads per engine: a sender, so that a large
message never blocks the loop while the engine is busy with a forward pass, and a reader, which
blocks on the engine's pipe and hands each output batch to the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from radixlm.core.messages import (
    AbortRequest,
    CheckInvariant,
    ControlCall,
    ControlReply,
    ControlRequest,
    CoreInfo,
    FlushCache,
    GetStats,
    Message,
    TokenOutput,
)
from radixlm.engine.args import EngineArgs
from radixlm.engine.frontend import GenerateInput, RequestState, tokenize_input
from radixlm.engine.process import EngineProcess
from radixlm.server.metrics import ServerMetrics
from radixlm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Inputs longer than this (in characters) are tokenized on a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 8192
# A control call waits at most one forward pass; longer means the engine is stuck.
CONTROL_TIMEOUT_S = 60.0
_STOP_SENDER = object()


class RequestFailed(RuntimeError):
    """A request ended without its answer; `status` is the HTTP status to report."""

    status = 500


class EngineUnavailable(RequestFailed):
    """The engine is still starting, or its process is gone."""

    status = 503


@dataclass(eq=False)
class RequestGroup:
    """The engine requests of one API call (a batch, n samples), in the order of the answer."""

    states: list[RequestState]
    is_batch: bool
    error: RequestFailed | None = None
    _dirty: set[int] = field(default_factory=set, init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def finished(self) -> bool:
        """Whether every request has its last output."""
        return all(s.finished for s in self.states)

    def notify(self, index: int) -> None:
        """Request `index` took in an output (called on the loop)."""
        self._dirty.add(index)
        self._changed.set()

    def fail(self, error: RequestFailed) -> None:
        """End the wait of whoever consumes this group with `error`."""
        self.error = error
        self._changed.set()

    async def updates(self) -> list[int]:
        """Wait for news; the indices of the requests that changed since the last call.

        Outputs that arrive while the consumer is busy coalesce into one update, so a slow client
        gets fewer, larger steps instead of a growing backlog. Raises RequestFailed (such as
        EngineUnavailable) when the requests cannot finish.
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
        """Wait until every request ended (raises RequestFailed)."""
        while not self.finished:
            await self.updates()


@dataclass(slots=True, eq=False)
class _Entry:
    group: RequestGroup
    index: int
    last_token_time: float | None = None


class TokenizerManager:
    """Owns the engine process and the tokenizer; turns API calls into engine requests."""

    def __init__(self, args: EngineArgs) -> None:
        from radixlm.models.default import default_model_path

        self.args = args
        self.model_path = args.model_path or default_model_path()
        self.served_model_name = args.served_model_name or served_name_of(self.model_path)
        self.metrics = ServerMetrics(self.served_model_name)
        self.engine: EngineProcess | None = None
        self.tokenizer: Tokenizer | None = None
        self.info: CoreInfo | None = None  # set once the engine has started
        # Why the engine cannot serve: None while starting and while healthy.
        self.failure: str | None = None
        # Called (on the loop) if the engine fails to start; the launcher then stops the server.
        self.on_start_failure: Callable[[str], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._running: dict[str, _Entry] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._outbox: queue.SimpleQueue[Message | object] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process in the background; until it is up, requests get 503."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._start_engine, name="radixlm-engine-start", daemon=True
        ).start()

    def _start_engine(self) -> None:
        try:
            engine = EngineProcess(self.args)
            tokenizer = Tokenizer.load(engine.info.model_path)
        except BaseException as e:
            logger.error("the engine failed to start: %s", e)
            self._post(self._start_failed, f"the engine failed to start: {e}")
            return
        if not self._post(self._attach, engine, tokenizer):
            engine.kill()  # the server stopped while the engine was loading

    def _attach(self, engine: EngineProcess, tokenizer: Tokenizer) -> None:
        if self._closing:
            engine.kill()
            return
        self.engine, self.tokenizer, self.info = engine, tokenizer, engine.info
        self._sender = threading.Thread(
            target=self._send_loop, args=(engine,), name="radixlm-sender", daemon=True
        )
        self._sender.start()
        threading.Thread(
            target=self._read_loop, args=(engine,), name="radixlm-reader", daemon=True
        ).start()
        logger.info(
            "serving model %r from %s (%d KV slots, context %d, %s %s)",
            self.served_model_name, engine.info.model_path, engine.info.max_total_num_tokens,
            engine.info.context_len, engine.info.device, engine.info.dtype,
        )  # fmt: skip

    def stop_serving(self, reason: str) -> None:
        """Refuse new requests and end running ones with an error (the server is going down)."""
        if self.ready:
            self.abort_all()  # the engine frees their slots while it winds down
        if self.failure is None:
            self.failure = reason
        self._fail_running(reason)

    def shutdown(self) -> None:
        """Stop the engine; requests still running end with an error."""
        self._closing = True
        self._engine_gone("the server is shutting down")
        if self._sender is not None:
            self._outbox.put(_STOP_SENDER)
            self._sender.join(timeout=5)
        if self.engine is not None:
            self.engine.shutdown()

    @property
    def ready(self) -> bool:
        """Whether requests can be served now."""
        # The reader thread sees the engine's pipe close the moment its process dies.
        return self.engine is not None and self.failure is None and not self._closing

    def check_ready(self) -> None:
        """Raise EngineUnavailable unless the engine can take requests."""
        if self.failure is not None:
            raise EngineUnavailable(self.failure)
        if self.engine is None:
            raise EngineUnavailable("the engine is starting; try again shortly")
        if not self.ready:
            raise EngineUnavailable("the engine process is gone")

    # ---- threads -----------------------------------------------------------------------------

    def _post(self, fn: Callable[..., object], *args: Any) -> bool:
        """Run fn on the loop from another thread; False when the loop is closed."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True

    def _send_loop(self, engine: EngineProcess) -> None:
        while (msg := self._outbox.get()) is not _STOP_SENDER:
            try:
                engine.send(cast("Message", msg))
            except (OSError, ValueError):
                self._post(self._engine_gone, "the engine process is gone")
                return

    def _read_loop(self, engine: EngineProcess) -> None:
        try:
            while True:
                batch = engine.recv()
                if not self._post(self._dispatch, batch):
                    return
        except (EOFError, OSError):
            pass
        engine.process.join(timeout=1)
        code = engine.process.exitcode
        self._post(self._engine_gone, f"the engine process exited (exit code {code})")

    # ---- on the loop -------------------------------------------------------------------------

    def _start_failed(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        if self.on_start_failure is not None and not self._closing:
            self.on_start_failure(reason)

    def _engine_gone(self, reason: str) -> None:
        """Fail every request and call in flight; later requests get 503."""
        if self.failure is None and not self._closing:
            logger.error("%s; failing %d running requests", reason, len(self._running))
        if self.failure is None:
            self.failure = reason
        self._fail_running(reason)

    def _fail_running(self, reason: str) -> None:
        error = EngineUnavailable(reason)
        for entry in self._running.values():
            entry.group.fail(error)
        self._running.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable(reason))
        self._calls.clear()

    def _dispatch(self, items: list[Any]) -> None:
        now = time.perf_counter()
        for item in items:
            if isinstance(item, ControlReply):
                fut = self._calls.pop(item.call_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(item.value)
                continue
            assert isinstance(item, TokenOutput)
            entry = self._running.get(item.rid)
            if entry is None:  # its client left and the engine was already told, or it failed
                continue
            try:
                self._apply(entry, item, now)
            except Exception as e:  # a bug must fail its request, never hang it or the others
                logger.exception("cannot process the output of request %s", item.rid)
                self.abort_unfinished(entry.group)
                for s in entry.group.states:
                    self._running.pop(s.req.rid, None)
                entry.group.fail(RequestFailed(f"internal error: {type(e).__name__}: {e}"))

    def _apply(self, entry: _Entry, item: TokenOutput, now: float) -> None:
        state = entry.group.states[entry.index]
        if item.new_ids:
            since_last = None if entry.last_token_time is None else now - entry.last_token_time
            self.metrics.on_tokens(len(item.new_ids), now, now - state.created, since_last)
            entry.last_token_time = now
        state.apply(item)
        if item.finished:
            del self._running[item.rid]
            self.metrics.on_finish(
                len(state.req.input_ids), state.cached_tokens, now - state.created, state.queue_time
            )
        entry.group.notify(entry.index)

    # ---- requests ------------------------------------------------------------------------------

    async def offload(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """Call fn here if the input is small, else on a worker thread (tokenizing is CPU work)."""
        if size <= INLINE_TOKENIZE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def submit(self, inp: GenerateInput) -> RequestGroup:
        """Validate, tokenize and send; ValueError for a bad request, EngineUnavailable if down."""
        self.check_ready()
        assert self.tokenizer is not None and self.info is not None
        texts = inp.text if isinstance(inp.text, list) else [inp.text]
        size = sum(len(t) for t in texts if isinstance(t, str))
        reqs = await self.offload(
            size,
            tokenize_input,
            inp,
            self.tokenizer,
            self.info.vocab_size,
            self.info.context_len,
        )
        self.check_ready()  # it may have died while we tokenized
        pool = self.info.max_total_num_tokens
        rids: set[str] = set()
        for r in reqs:
            if len(r.input_ids) + 1 > pool:
                raise ValueError(
                    f"the prompt has {len(r.input_ids)} tokens, but the KV cache holds only "
                    f"{pool} (--max-total-tokens)"
                )
            if r.rid in self._running or r.rid in rids:
                raise ValueError(f"rid {r.rid!r} is already in use by a running request")
            rids.add(r.rid)
        group = RequestGroup(
            [RequestState(r, self.tokenizer, inp.return_text_in_logprobs) for r in reqs],
            is_batch=inp.is_batch or len(reqs) > 1,
        )
        for i, r in enumerate(reqs):
            self._running[r.rid] = _Entry(group, i)
            self._outbox.put(r)
        return group

    def abort(self, rid: str) -> bool:
        """Abort a running request; it ends with finish reason abort. False if rid is unknown."""
        if rid not in self._running or self.failure is not None:
            return False
        self._outbox.put(AbortRequest(rid))
        return True

    def abort_unfinished(self, group: RequestGroup) -> None:
        """Abort whatever in the group has not ended (its client went away)."""
        for s in group.states:
            if not s.finished:
                self.abort(s.req.rid)

    def abort_all(self) -> int:
        """Abort every running request; how many."""
        rids = list(self._running)
        for rid in rids:
            self.abort(rid)
        return len(rids)

    @property
    def num_running(self) -> int:
        """Requests sent to the engine that have not ended."""
        return len(self._running)

    # ---- control calls -----------------------------------------------------------------------

    async def control(self, call: ControlCall) -> Any:
        """A synchronous call into the engine core (stats, flush_cache, check_invariant)."""
        self.check_ready()
        assert self._loop is not None
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = fut
        self._outbox.put(ControlRequest(call_id, call))
        try:
            value = await asyncio.wait_for(fut, CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._calls.pop(call_id, None)
            raise EngineUnavailable(
                f"the engine did not answer {type(call).__name__} in {CONTROL_TIMEOUT_S:.0f}s"
            ) from None
        if isinstance(value, BaseException):
            raise value
        return value

    async def flush_cache(self) -> bool:
        """Empty the radix cache; False (nothing changes) while requests run."""
        if self._running:
            return False
        return bool(await self.control(FlushCache()))

    async def stats(self) -> dict[str, Any]:
        """Scheduler and cache numbers."""
        return dataclasses.asdict(await self.control(GetStats()))

    async def check_invariant(self) -> None:
        """Raise AssertionError unless every KV slot has exactly one owner."""
        await self.control(CheckInvariant())


def served_name_of(model_path: str) -> str:
    """The default served model name: the folder's or file's name (without .gguf)."""
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name
