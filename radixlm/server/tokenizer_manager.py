"""The HTTP side's engine client: tokenize, submit, and hand outputs to the event loop.

The engine core runs in its own process; an `EngineClient` over a `ProcessTransport` routes its
outputs (radixlm/engine/client.py). Everything here runs on the event loop, which never waits on
the engine: messages leave through the transport's sender thread, and outputs arrive from its
reader thread through a `LoopInbox`, one wake-up per output batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from radixlm.core.messages import (
    CheckInvariant,
    ControlCall,
    CoreInfo,
    CoreStats,
    FlushCache,
    GetStats,
)
from radixlm.engine.args import MAX_QUEUED_REQUESTS, EngineArgs
from radixlm.engine.client import (
    EngineClient,
    EngineDeadError,
    LoopInbox,
    Output,
    RequestGroup,
    Sink,
    Transport,
)
from radixlm.engine.frontend import GenerateInput, RequestState, tokenize_input
from radixlm.engine.process import EngineProcess
from radixlm.engine.transport import ProcessTransport
from radixlm.server.errors import EngineUnavailable, Overloaded, RequestFailed
from radixlm.server.metrics import ServerMetrics
from radixlm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Inputs longer than this (in characters) are tokenized on a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 8192
# A control call waits at most one forward pass; longer means the engine is stuck.
CONTROL_TIMEOUT_S = 60.0


@dataclass(slots=True, eq=False)
class _Entry:
    """One request of a group, as its outputs reach the loop."""

    group: RequestGroup
    index: int
    last_token_time: float | None = None


class TokenizerManager:
    """Owns the engine process and the tokenizer; turns API calls into engine requests."""

    def __init__(self, args: EngineArgs, max_queued_requests: int = MAX_QUEUED_REQUESTS) -> None:
        from radixlm.models.default import default_model_path

        self.args = args
        # Requests in flight beyond the engine's running limit before new ones get a 503.
        self.max_queued_requests = max_queued_requests
        self.model_path = args.model_path or default_model_path()
        self.served_model_name = args.served_model_name or served_name_of(self.model_path)
        self.metrics = ServerMetrics(self.served_model_name)
        self.control_timeout_s = CONTROL_TIMEOUT_S
        self.client: EngineClient | None = None  # set once the engine has started
        self.tokenizer: Tokenizer | None = None
        self.info: CoreInfo | None = None
        # Why the server cannot serve before it has a client (its engine failed to start, or it
        # is going down); once it has one, the client's error says why.
        self.failure: str | None = None
        # Called (on the loop) if the engine fails to start; the launcher then stops the server.
        self.on_start_failure: Callable[[str], None] | None = None
        self._inbox: LoopInbox | None = None
        self._closing = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process in the background; until it is up, requests get 503."""
        inbox = LoopInbox(asyncio.get_running_loop())
        threading.Thread(
            target=self._start_engine, args=(inbox,), name="radixlm-engine-start", daemon=True
        ).start()

    def _start_engine(self, inbox: LoopInbox) -> None:
        try:
            engine = EngineProcess(self.args)
            tokenizer = Tokenizer.load(engine.info.model_path)
        except BaseException as e:
            logger.error("the engine failed to start: %s", e)
            inbox.post(self._start_failed, f"the engine failed to start: {e}")
            return
        if not inbox.post(self.attach, ProcessTransport(engine), engine.info, tokenizer):
            engine.kill()  # the server stopped while the engine was loading

    def attach(self, transport: Transport, info: CoreInfo, tokenizer: Tokenizer) -> None:
        """Serve from a started core over `transport` (called on the loop)."""
        if self._closing:
            transport.close()
            return
        self._inbox = LoopInbox(asyncio.get_running_loop())
        self.client = EngineClient(transport)
        self.tokenizer, self.info = tokenizer, info
        logger.info(
            "serving model %r from %s (%d KV slots, context %d, %s %s)",
            self.served_model_name, info.model_path, info.max_total_num_tokens,
            info.context_len, info.device, info.dtype,
        )  # fmt: skip

    def _start_failed(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        if self.on_start_failure is not None and not self._closing:
            self.on_start_failure(reason)

    def stop_serving(self, reason: str) -> None:
        """Refuse new requests and end running ones with an error (the server is going down);
        the engine frees their slots while it winds down."""
        if self.client is not None:
            self.client.stop(reason)
        elif self.failure is None:
            self.failure = reason

    def shutdown(self) -> None:
        """Stop the engine; requests still running end with an error."""
        self._closing = True
        if self.client is not None:
            self.client.shutdown("the server is shutting down")
        elif self.failure is None:
            self.failure = "the server is shutting down"

    @property
    def ready(self) -> bool:
        """Whether requests can be served now."""
        # The transport's reader thread sees the engine's pipe close the moment its process dies.
        return (
            self.client is not None
            and self.client.error is None
            and self.failure is None
            and not self._closing
        )

    def check_ready(self) -> None:
        """Raise EngineUnavailable unless the engine can take requests."""
        self._ready_client()

    def _ready_client(self) -> EngineClient:
        if self.client is not None and self.client.error is not None:
            raise EngineUnavailable(str(self.client.error))
        if self.failure is not None:
            raise EngineUnavailable(self.failure)
        if self.client is None:
            raise EngineUnavailable("the engine is starting; try again shortly")
        if self._closing:
            raise EngineUnavailable("the server is shutting down")
        return self.client

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
        limit = self.info.max_running_requests + self.max_queued_requests
        if inp.num_requests > limit:  # not even an idle server takes it: retrying cannot help
            raise ValueError(
                f"the call makes {inp.num_requests} requests (prompts times n), more than the "
                f"server takes at once ({limit}: --max-running-requests plus "
                "--max-queued-requests)"
            )
        if self.num_running + inp.num_requests > limit:
            raise Overloaded(
                f"the server is full: {self.num_running} requests in flight, at most {limit} "
                "(--max-queued-requests beyond --max-running-requests); retry shortly"
            )
        texts = inp.text if isinstance(inp.text, list) else [inp.text]
        size = sum(len(t) for t in texts if isinstance(t, str))
        reqs = await self.offload(size, tokenize_input, inp, self.tokenizer, self.info)
        client = self._ready_client()  # it may have died while we tokenized
        group = RequestGroup(
            [RequestState(r, self.tokenizer, inp.return_text_in_logprobs) for r in reqs],
            is_batch=inp.is_batch or len(reqs) > 1,
        )
        try:
            client.submit(reqs, [self._sink(_Entry(group, i)) for i in range(len(reqs))])
        except EngineDeadError as e:
            raise EngineUnavailable(str(e)) from None
        return group

    def _sink(self, entry: _Entry) -> Sink:
        inbox = self._inbox
        assert inbox is not None
        return lambda out: inbox.post(self._take, entry, out)

    def _take(self, entry: _Entry, out: Output) -> None:
        """One output of a request, on the loop: metrics, then the request's state."""
        group = entry.group
        if isinstance(out, EngineDeadError):
            group.fail(EngineUnavailable(str(out)))
            return
        try:
            now = time.perf_counter()
            state = group.states[entry.index]
            if out.new_ids:
                since_last = None if entry.last_token_time is None else now - entry.last_token_time
                self.metrics.on_tokens(len(out.new_ids), now, now - state.created, since_last)
                entry.last_token_time = now
            group.take(entry.index, out)
            if out.finished:
                self.metrics.on_finish(
                    len(state.req.input_ids),
                    state.cached_tokens,
                    now - state.created,
                    state.queue_time,
                )
        except Exception as e:  # a bug must fail its request, never hang it or the others
            logger.exception("cannot process the output of request %s", out.rid)
            if self.client is not None:
                self.client.close(group.rids)
            group.fail(RequestFailed(f"internal error: {type(e).__name__}: {e}"))

    def abort(self, rid: str) -> bool:
        """Abort a running request; it ends with finish reason abort. False if rid is unknown."""
        return self.client is not None and self.client.abort(rid)

    def abort_unfinished(self, group: RequestGroup) -> None:
        """Abort whatever in the group has not ended (its client went away)."""
        for s in group.states:
            if not s.finished:
                self.abort(s.req.rid)

    def abort_all(self) -> int:
        """Abort every running request; how many."""
        return 0 if self.client is None else self.client.abort_all()

    @property
    def num_running(self) -> int:
        """Requests sent to the engine that have not ended."""
        return 0 if self.client is None else self.client.num_running

    # ---- control calls -----------------------------------------------------------------------

    async def control(self, call: ControlCall) -> object:
        """A synchronous call into the engine core (stats, flush_cache, check_invariant);
        EngineUnavailable if the engine is down or does not answer in control_timeout_s."""
        client = self._ready_client()
        try:
            return await client.control_async(call, self.control_timeout_s)
        except (EngineDeadError, TimeoutError) as e:
            raise EngineUnavailable(str(e)) from None

    async def flush_cache(self) -> bool:
        """Empty the radix cache; False (nothing changes) while requests run."""
        if self.num_running:
            return False
        return bool(await self.control(FlushCache()))

    async def stats(self) -> dict[str, Any]:
        """Scheduler and cache numbers."""
        stats = await self.control(GetStats())
        assert isinstance(stats, CoreStats)
        return dataclasses.asdict(stats)

    async def check_invariant(self) -> None:
        """Raise AssertionError unless every KV slot has exactly one owner."""
        await self.control(CheckInvariant())


def served_name_of(model_path: str) -> str:
    """The default served model name: the folder's or file's name (without .gguf)."""
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name
