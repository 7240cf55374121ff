"""The in-process Engine: SGLang's offline API over an engine client whose core runs in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

from radixlm.core.messages import (
    AddPublicPrefix,
    CheckInvariant,
    ClearDiskCache,
    CoreStats,
    FlushCache,
    GetStats,
    PinPrefix,
    Unpin,
)
from radixlm.engine.args import EngineArgs
from radixlm.engine.client import (
    EngineClient,
    EngineDeadError,
    LoopInbox,
    Output,
    RequestGroup,
    Sink,
)
from radixlm.engine.core import EngineCore
from radixlm.engine.frontend import GenerateInput, RequestState, prefix_ids, tokenize_input
from radixlm.engine.transport import ThreadTransport
from radixlm.multimodal.inputs import ImageSources
from radixlm.tenancy import PinInfo, check_cache_salt, default_pin_quota, salt_tenant

__all__ = ["Engine", "EngineDeadError"]


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
        self.info = self.core.info()
        self._client = EngineClient(ThreadTransport(self.core.run))

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
        image_data: str | list[Any] | None = None,
        cache_salt: str | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a batch (a list); stream=True yields dicts
        whose text and output_ids are cumulative. `image_data`: for a LLaVA-style model, an
        image (file path, data URL or base64) or a list per prompt, each where the prompt has
        an image token. Bad input raises ValueError."""
        inp = _generate_input(locals())  # first: locals() is the call's arguments
        states = self._states(inp)
        outputs: queue.SimpleQueue[tuple[int, Output]] = queue.SimpleQueue()
        self._client.submit(
            [s.req for s in states],
            [_to_queue(outputs, i) for i in range(len(states))],
        )
        updates = self._updates(states, outputs)
        if stream:
            return self._stream(states, updates)
        with contextlib.closing(updates):
            for _ in updates:
                pass
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
        image_data: str | list[Any] | None = None,
        cache_salt: str | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """`generate` for asyncio code, as SGLang's Engine has it: awaiting gives the output (a
        dict, or a list for a batch), or with stream=True an async iterator of cumulative dicts.
        The event loop is never blocked; leaving a stream early aborts its requests."""
        inp = _generate_input(locals())  # first: locals() is the call's arguments
        group = RequestGroup(self._states(inp), inp.is_batch)
        inbox = LoopInbox(asyncio.get_running_loop())
        self._client.submit(
            [s.req for s in group.states],
            [_to_group(inbox, group, i) for i in range(len(group.states))],
        )
        updates = self._async_updates(group)
        if stream:
            return self._async_stream(group, updates)
        async with contextlib.aclosing(updates):
            async for _ in updates:
                pass
        return self._result(inp, group.states)

    def _states(self, inp: GenerateInput) -> list[RequestState]:
        """Validate and tokenize (ValueError for bad input); one state per engine request."""
        self._client.check_alive()
        reqs = tokenize_input(inp, self.tokenizer, self.info, ImageSources(any_path=True))
        return [RequestState(r, self.tokenizer, inp.return_text_in_logprobs) for r in reqs]

    @staticmethod
    def _result(
        inp: GenerateInput, states: list[RequestState]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The finished requests' dicts: a list for a batch, else the one dict."""
        outs = [s.to_dict() for s in states]
        return outs if inp.is_batch or len(outs) > 1 else outs[0]

    def _updates(
        self, states: list[RequestState], outputs: queue.SimpleQueue[tuple[int, Output]]
    ) -> Generator[list[int], None, None]:
        """Apply the requests' outputs as they arrive; yields the indices of the requests each
        round changed. Requests still running when this stops are aborted."""
        try:
            while not all(s.finished for s in states):
                changed: set[int] = set()
                item = outputs.get()
                while True:  # this output, then whatever else has arrived
                    i, out = item
                    if isinstance(out, BaseException):
                        raise out
                    states[i].apply(out)
                    changed.add(i)
                    try:
                        item = outputs.get_nowait()
                    except queue.Empty:
                        break
                yield sorted(changed)
        finally:
            self._client.close(s.req.rid for s in states)

    @staticmethod
    def _stream(
        states: list[RequestState], updates: Generator[list[int], None, None]
    ) -> Iterator[dict[str, Any]]:
        """Cumulative chunks; a batch's are tagged with their index."""
        with contextlib.closing(updates):
            for changed in updates:
                for i in changed:
                    out = states[i].to_dict()
                    yield out if len(states) == 1 else {"index": i, **out}

    async def _async_updates(self, group: RequestGroup) -> AsyncGenerator[list[int], None]:
        """The group's updates until every request ended; those still running when this stops
        are aborted."""
        try:
            while not group.finished:
                yield await group.updates()
        finally:
            self._client.close(group.rids)

    @staticmethod
    async def _async_stream(
        group: RequestGroup, updates: AsyncGenerator[list[int], None]
    ) -> AsyncIterator[dict[str, Any]]:
        """Cumulative chunks, as `generate(stream=True)` yields them."""
        async with contextlib.aclosing(updates):
            async for changed in updates:
                for i in changed:
                    out = group.states[i].to_dict()
                    yield out if len(group.states) == 1 else {"index": i, **out}

    def abort_request(self, rid: str) -> None:
        """Abort a running request by its rid."""
        self._client.abort(rid)

    def flush_cache(self) -> bool:
        """Drop the radix cache (what the disk tier holds stays); False (nothing changes) while
        requests are running."""
        return bool(self._client.control(FlushCache()))

    def clear_hicache_storage(self) -> int | None:
        """Delete every block of the disk KV tier; the tokens they held, None without a tier."""
        held = self._client.control(ClearDiskCache())
        assert held is None or isinstance(held, int)
        return held

    def add_public_prefix(
        self, text: str | None = None, input_ids: list[int] | None = None
    ) -> list[int]:
        """Register a prefix every cache_salt shares (text or token ids); returns its ids."""
        ids = prefix_ids(self.tokenizer, text, input_ids, self.info.vocab_size)
        self._client.control(AddPublicPrefix(ids))
        return ids

    def pin_prefix(
        self,
        text: str | None = None,
        input_ids: list[int] | None = None,
        ttl_s: float = 300.0,
        cache_salt: str | None = None,
    ) -> dict[str, Any]:
        """Prefill (if needed) and pin a prefix so eviction skips it for ttl_s seconds; returns
        the pin (`pin_id`, `tokens`, `expires_in_s`). A salt's tenant may pin a quarter of the
        pool (PinQuotaExceeded past it)."""
        ids = prefix_ids(self.tokenizer, text, input_ids, self.info.vocab_size)
        salt = check_cache_salt(cache_salt)
        tenant = "" if salt is None else salt_tenant(salt) or salt
        quota = default_pin_quota(self.info.max_total_num_tokens)
        call = PinPrefix(ids, salt, tenant, ttl_s, quota)
        pin = self._client.control(call)
        if pin is None:  # not all cached: prefill it, then pin
            self.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, cache_salt=salt)
            pin = self._client.control(call)
        if not isinstance(pin, PinInfo):
            raise RuntimeError("the prefix was evicted before it could be pinned; try again")
        return dataclasses.asdict(pin)

    def unpin(self, pin_id: str) -> bool:
        """End a pin; False if there is none with this id."""
        return bool(self._client.control(Unpin(pin_id, None)))

    def get_stats(self) -> dict[str, Any]:
        """Scheduler and cache counters."""
        stats = self._client.control(GetStats())
        assert isinstance(stats, CoreStats)
        return dataclasses.asdict(stats)

    def check_invariant(self) -> None:
        """Raise AssertionError unless every KV slot has exactly one owner (for tests)."""
        self._client.control(CheckInvariant())

    def get_server_info(self) -> dict[str, Any]:
        """The resolved arguments plus live statistics."""
        return {**self.args.to_dict(), "model_path": self.core.model_path, **self.get_stats()}

    def shutdown(self) -> None:
        """Stop the core thread; pending calls fail with EngineDeadError."""
        self._client.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _to_queue(outputs: queue.SimpleQueue[tuple[int, Output]], index: int) -> Sink:
    """Where request `index` of a blocking call sends its outputs."""
    return lambda out: outputs.put((index, out))


def _to_group(inbox: LoopInbox, group: RequestGroup, index: int) -> Sink:
    """Where request `index` of an asyncio call sends its outputs: onto the caller's loop."""
    return lambda out: inbox.post(_take, group, index, out)


def _take(group: RequestGroup, index: int, out: Output) -> None:
    """Apply one output to an asyncio caller's group (on its loop); an error ends its wait."""
    if isinstance(out, EngineDeadError):
        group.fail(out)
        return
    try:
        group.take(index, out)
    except Exception as e:  # raised in the caller, as if it had applied the output itself
        group.fail(e)
