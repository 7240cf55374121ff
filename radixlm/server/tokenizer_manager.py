"""The HTTP side's engine client: tokenize, submit, and hand outputs to the event loop.

The engine core runs in its own process; an `EngineClient` over a `ProcessTransport` routes its
outputs (radixlm/engine/client.py). Everything here runs on the event loop, which never waits on
the engine: messages leave through the transport's sender thread, and outputs arrive from its
reader thread through a `LoopInbox`, one wake-up per output batch.

When the engine process dies, streams that already sent output fail with a clear error; the
other requests (their clients have seen nothing yet) are held, and a new engine starts after a
backoff; the held requests then run on it from the start. More than `max_engine_restarts` deaths within the window and the server stays down.
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

from radixlm.core.finish import FinishReason
from radixlm.core.messages import (
    AbortRequest,
    CheckInvariant,
    ClearDiskCache,
    ControlCall,
    CoreInfo,
    CoreStats,
    FlushCache,
    GetStats,
    TokenOutput,
)
from radixlm.engine.args import EngineArgs
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
from radixlm.multimodal.inputs import ImageSources
from radixlm.server.args import ServerArgs
from radixlm.server.engine_launch import Launch, RestartBudget, launch_process
from radixlm.server.errors import EngineUnavailable, Overloaded, RequestFailed
from radixlm.server.metrics import ServerMetrics
from radixlm.tokenizer import Tokenizer
from radixlm.utils import freeze_heap

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
    started: bool = False  # an output of it reached its group

    @property
    def state(self) -> RequestState:
        """The request's state in its group."""
        return self.group.states[self.index]

    @property
    def unseen(self) -> bool:
        """Whether its consumer has seen nothing of it yet (so it can run again from the
        start): no output came, or the consumer waits for the finished answer only."""
        return not self.started or not self.group.stream

    def start_over(self, tokenizer: Tokenizer) -> None:
        """Forget its outputs, to run it again on another engine."""
        if self.started:
            state = self.state
            self.group.states[self.index] = RequestState(
                state.req, tokenizer, state.return_text_in_logprobs
            )
            self.started, self.last_token_time = False, None


class TokenizerManager:
    """Owns the engine process and the tokenizer; turns API calls into engine requests."""

    def __init__(
        self,
        args: EngineArgs,
        server_args: ServerArgs | None = None,
        launch: Launch | None = None,
    ) -> None:
        from radixlm.models.default import default_model_path

        self.args = args
        self.server_args = server_args or ServerArgs()
        self.model_path = args.model_path or default_model_path()
        self.served_model_name = args.served_model_name or served_name_of(self.model_path)
        self.metrics = ServerMetrics(self.served_model_name)
        self.control_timeout_s = CONTROL_TIMEOUT_S
        self.client: EngineClient | None = None  # set once the engine has started
        self.tokenizer: Tokenizer | None = None
        self.info: CoreInfo | None = None
        # Why the server cannot serve before it has a client (its engine failed to start, or it
        # is going down, or it gave up restarting); once it has one, the client's error says why.
        self.failure: str | None = None
        # Called (on the loop) if the engine fails to start; the launcher then stops the server.
        self.on_start_failure: Callable[[str], None] | None = None
        # Set by the server's own process: freeze its start-up heap (the app, the tokenizer)
        # once the first engine is up, so that a full collection, a stall of every stream and
        # of request intake (~50 ms over ~75,000 objects with the default model), no longer
        # walks it. The number frozen, for /server_info.
        self.freeze_heap_at_start = False
        self.gc_frozen_objects = 0
        self._launch = launch or launch_process(args)
        self._restarts = RestartBudget(
            self.server_args.max_engine_restarts, self.server_args.engine_restart_window_s
        )
        # Why the engine is being restarted; None while it serves (or before the first start).
        self._restarting: str | None = None
        self._held: dict[str, _Entry] = {}  # requests with no output yet, for the next engine
        self._inbox: LoopInbox | None = None
        self._closing = threading.Event()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process in the background; until it is up, requests get 503."""
        self._inbox = LoopInbox(asyncio.get_running_loop())
        self._start_engine(0.0)

    def _start_engine(self, delay_s: float) -> None:
        threading.Thread(
            target=self._run_launch, args=(delay_s,), name="radixlm-engine-start", daemon=True
        ).start()

    def _run_launch(self, delay_s: float) -> None:
        inbox = self._inbox
        assert inbox is not None
        if self._closing.wait(delay_s):
            return
        try:
            transport, info, tokenizer = self._launch()
        except BaseException as e:
            logger.error("the engine failed to start: %s", e)
            inbox.post(self._start_failed, f"the engine failed to start: {e}")
            return
        if not inbox.post(self.attach, transport, info, tokenizer):
            transport.close()  # the server stopped while the engine was loading

    def attach(self, transport: Transport, info: CoreInfo, tokenizer: Tokenizer) -> None:
        """Serve from a started core over `transport` (called on the loop); requests held
        through a restart run on it."""
        if self._closing.is_set():
            transport.close()
            return
        if self._inbox is None:
            self._inbox = LoopInbox(asyncio.get_running_loop())
        inbox = self._inbox
        self.client = EngineClient(transport, lambda error: inbox.post(self._engine_lost, error))
        self.tokenizer, self.info = tokenizer, info
        if self.freeze_heap_at_start and not self.gc_frozen_objects:
            self.gc_frozen_objects = freeze_heap()
        logger.info(
            "serving model %r from %s (%d KV slots, context %d, %s %s)",
            self.served_model_name, info.model_path, info.max_total_num_tokens,
            info.context_len, info.device, info.dtype,
        )  # fmt: skip
        if self._restarting is not None:
            self._restarting = None
            self.metrics.engine_restarts += 1
            self._resubmit_held(self.client)

    def _resubmit_held(self, client: EngineClient) -> None:
        held = [e for e in self._held.values() if e.group.error is None]
        self._held.clear()
        assert self.tokenizer is not None
        for entry in held:
            entry.start_over(self.tokenizer)
        if held:
            logger.info("running %d requests held through the restart", len(held))
            client.submit([e.state.req for e in held], [self._sink(e) for e in held])

    def _engine_lost(self, error: EngineDeadError) -> None:
        """The engine ended by itself (on the loop, before its requests hear of it)."""
        if not self._closing.is_set():
            self._restart(str(error))

    def _restart(self, reason: str) -> None:
        """Start a new engine after a backoff, unless the restart budget is spent."""
        delay = self._restarts.next_delay(time.monotonic())
        if delay is None:
            budget = self._restarts
            why = (
                f"it was restarted {budget.max_restarts} times within {budget.window_s:.0f}s"
                if budget.max_restarts
                else "engine restarts are off (--max-engine-restarts 0)"
            )
            self._give_up(f"{reason}; {why}, so the server stays down")
            return
        logger.error("%s; restarting the engine in %.1fs", reason, delay)
        self._restarting = reason
        self._start_engine(delay)

    def _give_up(self, reason: str) -> None:
        logger.error("%s", reason)
        self._restarting = None
        if self.failure is None:
            self.failure = reason
        self._fail_held(reason)

    def _fail_held(self, reason: str) -> None:
        held = list(self._held.values())
        self._held.clear()
        for entry in held:
            entry.group.fail(EngineUnavailable(reason))

    def _start_failed(self, reason: str) -> None:
        if self._restarting is not None:  # a restart that failed counts as one more death
            if not self._closing.is_set():
                self._restart(reason)
            return
        if self.failure is None:
            self.failure = reason
        if self.on_start_failure is not None and not self._closing.is_set():
            self.on_start_failure(reason)

    def stop_serving(self, reason: str) -> None:
        """Refuse new requests and end running ones with an error (the server is going down);
        the engine frees their slots while it winds down."""
        self._closing.set()
        if self.client is not None:
            self.client.stop(reason)
        if self.failure is None:
            self.failure = reason
        self._fail_held(reason)

    def shutdown(self) -> None:
        """Stop the engine; requests still running end with an error."""
        reason = "the server is shutting down"
        self._closing.set()
        if self.client is not None:
            self.client.shutdown(reason)
        if self.failure is None:
            self.failure = reason
        self._fail_held(reason)

    @property
    def ready(self) -> bool:
        """Whether requests can be served now."""
        # The transport's reader thread sees the engine's pipe close the moment its process dies.
        return (
            self.client is not None
            and self.client.error is None
            and self.failure is None
            and not self._closing.is_set()
        )

    def check_ready(self) -> None:
        """Raise EngineUnavailable unless the engine can take requests."""
        self._ready_client()

    def _ready_client(self) -> EngineClient:
        if self.failure is not None:
            raise EngineUnavailable(self.failure)
        if self._restarting is not None:
            raise EngineUnavailable(
                f"the engine is restarting ({self._restarting}); try again shortly",
                retry_after_s=2,
            )
        if self.client is not None and self.client.error is not None:
            raise EngineUnavailable(str(self.client.error))
        if self.client is None:
            raise EngineUnavailable("the engine is starting; try again shortly", retry_after_s=2)
        if self._closing.is_set():
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
        limit = self.info.max_running_requests + self.server_args.max_queued_requests
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
        self._check_queued_tokens(0)
        texts = inp.text if isinstance(inp.text, list) else [inp.text]
        size = sum(len(t) for t in texts if isinstance(t, str))
        if inp.image_data:
            size += INLINE_TOKENIZE_CHARS + 1  # decoding images (or fetching them) is slow too
        images = ImageSources(self.server_args.image_dir, self.server_args.allow_image_urls)
        reqs = await self.offload(size, tokenize_input, inp, self.tokenizer, self.info, images)
        client = self._ready_client()  # it may have died while we tokenized
        self._check_queued_tokens(sum(len(r.input_ids) for r in reqs))
        group = RequestGroup(
            [RequestState(r, self.tokenizer, inp.return_text_in_logprobs) for r in reqs],
            is_batch=inp.is_batch or len(reqs) > 1,
            stream=inp.stream,
        )
        try:
            client.submit(reqs, [self._sink(_Entry(group, i)) for i in range(len(reqs))])
        except EngineDeadError as e:
            raise EngineUnavailable(str(e)) from None
        return group

    def _check_queued_tokens(self, new: int) -> None:
        """Overloaded if the prompts in flight, plus `new` tokens, pass --max-queued-tokens (one
        request alone is always let through: the context bounds it)."""
        queued, limit = self.num_prompt_tokens, self.server_args.max_queued_tokens
        if queued and queued + new > limit or queued >= limit:
            raise Overloaded(
                f"the server is full: {queued} prompt tokens in flight, at most {limit} "
                "(--max-queued-tokens); retry shortly"
            )

    def _sink(self, entry: _Entry) -> Sink:
        inbox = self._inbox
        assert inbox is not None
        return lambda out: inbox.post(self._take, entry, out)

    def _take(self, entry: _Entry, out: Output) -> None:
        """One output of a request, on the loop: metrics, then the request's state."""
        group = entry.group
        if isinstance(out, EngineDeadError):
            if self._restarting is not None and group.error is None and entry.unseen:
                self._held[entry.state.req.rid] = entry  # nothing of it was seen: run it again
            else:  # the reason the server gave up, if it did, says more
                group.fail(EngineUnavailable(self.failure or str(out)))
            return
        entry.started = True
        try:
            now = time.perf_counter()
            state = entry.state
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
        entry = self._held.pop(rid, None)
        if entry is not None:  # it waits for a restarted engine: it ends here
            req = entry.state.req
            reason = FinishReason.abort(AbortRequest(rid).message)  # as the engine says it
            self._take(entry, TokenOutput(rid, [], len(req.input_ids), 0, None, reason))
            return True
        return self.client is not None and self.client.abort(rid)

    def abort_unfinished(self, group: RequestGroup) -> None:
        """Abort whatever in the group has not ended (its client went away)."""
        for s in group.states:
            if not s.finished:
                self.abort(s.req.rid)

    def abort_all(self) -> int:
        """Abort every running request; how many."""
        held = [rid for rid in list(self._held) if self.abort(rid)]
        return len(held) + (0 if self.client is None else self.client.abort_all())

    @property
    def num_running(self) -> int:
        """Requests sent to the engine (or held for its restart) that have not ended."""
        return len(self._held) + (0 if self.client is None else self.client.num_running)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the requests counted in num_running."""
        held = sum(len(e.state.req.input_ids) for e in self._held.values())
        return held + (0 if self.client is None else self.client.num_prompt_tokens)

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

    async def clear_hicache_storage(self) -> int | None:
        """Delete every block of the disk KV tier; the tokens they held, None without a tier."""
        held = await self.control(ClearDiskCache())
        assert held is None or isinstance(held, int)
        return held

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
