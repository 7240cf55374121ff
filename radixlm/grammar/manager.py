"""Structured output for the engine: compile off its thread, cache, fill the masks of a step.

A request with a grammar waits here, never in the scheduler's queue, until its grammar is
compiled: the compile runs on one worker thread (llguidance drops the GIL while it builds a
matcher), so a slow grammar delays only its own request. A cached grammar is ready at once.
Each request then carries its own GrammarState (radixlm/grammar/state.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from radixlm.core.plan import StepPlan
from radixlm.core.request import Req
from radixlm.grammar.base import GrammarBackend, GrammarSpec
from radixlm.grammar.closing import Closer
from radixlm.grammar.state import GrammarState
from radixlm.tokenizer import Tokenizer

# How long a scheduler with nothing else to do waits for a compile before reading its inbox.
_IDLE_WAIT_S = 0.01


def default_backend(tokenizer: Tokenizer, vocab_size: int | None) -> GrammarBackend:
    """llguidance over the model's tokenizer."""
    from radixlm.grammar.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size)


class GrammarCache:
    """Compiled grammars by spec, least recently used dropped first; thread-safe."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: GrammarSpec) -> Any | None:
        """The compiled grammar of spec, or None."""
        with self._lock:
            compiled = self._items.get(spec)
            if compiled is not None:
                self._items.move_to_end(spec)
            return compiled

    def put(self, spec: GrammarSpec, compiled: Any) -> None:
        """Remember a compiled grammar."""
        with self._lock:
            self._items[spec] = compiled
            self._items.move_to_end(spec)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class GrammarManager:
    """Compiles requests' grammars and fills each step's masks; the backend is built on first
    use (it takes about a second)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int | None = None,
        jump_forward: bool = True,
        cache_size: int = 256,
        backend_factory: Callable[[Tokenizer, int | None], GrammarBackend] = default_backend,
    ) -> None:
        self.tokenizer, self.vocab_size, self.jump_forward = tokenizer, vocab_size, jump_forward
        self.cache = GrammarCache(cache_size)
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._closer: Closer | None = None
        self._backend_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._compiling: list[tuple[Req, Future[Any]]] = []
        self._ready: list[Req] = []  # cache hits: ready without a compile

    @property
    def backend(self) -> GrammarBackend:
        """The backend, built by whichever thread needs it first."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._factory(self.tokenizer, self.vocab_size)
            return self._backend

    @property
    def closer(self) -> Closer:
        """Budget-aware closing over the backend, built with it."""
        backend = self.backend
        with self._backend_lock:
            if self._closer is None:
                self._closer = Closer(backend)
            return self._closer

    # ---- compiling ---------------------------------------------------------------------------

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet handed back by poll."""
        return len(self._compiling) + len(self._ready)

    def submit(self, req: Req) -> None:
        """Start getting req's grammar; poll hands req back once req.grammar is set."""
        spec = GrammarSpec.from_params(req.params)
        assert spec is not None, "submit only requests with a grammar"
        compiled = self.cache.get(spec)
        if compiled is not None:
            req.grammar = self.new_state(compiled, _closes(req, spec))
            self._ready.append(req)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="radixlm-grammar")
        self._compiling.append((req, self._executor.submit(self._compile, spec)))

    def _compile(self, spec: GrammarSpec) -> Any:
        compiled = self.cache.get(spec)  # an identical request may have compiled it meanwhile
        if compiled is None:
            compiled = self.backend.compile(spec)
            self.cache.put(spec, compiled)
        return compiled

    def new_state(self, compiled: Any, close: bool = False) -> GrammarState:
        """A request's grammar state at the start of a compiled grammar; `close`: with
        budget-aware closing."""
        closer = self.closer if close else None
        return GrammarState(self.backend.matcher(compiled), self.backend, self.jump_forward, closer)

    def poll(
        self, context_len: int, block: bool = False
    ) -> tuple[list[Req], list[tuple[Req, str]]]:
        """Requests whose grammar is ready (req.grammar set, and req.output_ids the forced start
        of the output), and those whose compile failed with the message why; `block` waits a
        little for a compile first (when idle otherwise)."""
        if block and not self._ready and self._compiling:
            wait([f for _, f in self._compiling], _IDLE_WAIT_S, FIRST_COMPLETED)
        ready, self._ready = self._ready, []
        failed: list[tuple[Req, str]] = []
        compiling: list[tuple[Req, Future[Any]]] = []
        for req, future in self._compiling:
            if not future.done():
                compiling.append((req, future))
                continue
            try:
                req.grammar = self.new_state(future.result(), _closes(req))
                ready.append(req)
            except Exception as e:  # a bad grammar (or a backend bug) ends this request only
                failed.append((req, str(e) or type(e).__name__))
        self._compiling = compiling
        for req in ready:
            req.output_ids = _grammar(req).start(req, context_len)
        return ready, failed

    def discard(self, rid: str) -> Req | None:
        """Forget a submitted request (aborted); returns it, or None if it is not here."""
        for i, req in enumerate(self._ready):
            if req.rid == rid:
                return self._ready.pop(i)
        for i, (req, _) in enumerate(self._compiling):
            if req.rid == rid:
                return self._compiling.pop(i)[0]  # the compile still fills the cache
        return None

    # ---- each step ---------------------------------------------------------------------------

    def fill_masks(self, plan: StepPlan) -> torch.Tensor | None:
        """Allowed tokens of the plan's sampled rows, in row order: bool [rows, V]; None if no
        sampled request has a grammar. A drafted request's first rows are where its draft tokens
        were fed (the grammar before each), its last after its whole output; a request without a
        grammar allows every token in each of its rows."""
        sampled = [r for r in plan.reqs if r.num_samples]
        states = [None if r.req.grammar is None else _grammar(r.req) for r in sampled]
        if all(s is None for s in states):
            return None
        after = self.backend.fill_masks([None if s is None else s.matcher for s in states])
        if all(r.num_samples == 1 for r in sampled):
            return after
        drafted = [
            (r.req, s)
            for r, s in zip(sampled, states, strict=True)
            if s is not None and r.num_samples > 1
        ]
        before = iter(self._masks_before_drafts(drafted))
        parts: list[torch.Tensor] = []
        for i, (r, s) in enumerate(zip(sampled, states, strict=True)):
            row = after[i : i + 1]
            if r.num_samples > 1:
                parts.append(next(before) if s is not None else row.expand(r.num_samples - 1, -1))
            parts.append(row)
        return torch.cat(parts)

    def _masks_before_drafts(
        self, drafted: Sequence[tuple[Req, GrammarState]]
    ) -> list[torch.Tensor]:
        """Each request's masks at its draft positions, [num_draft, V]: each matcher steps back
        over its request's draft, then accepts it again one token at a time, between batched
        fills (microseconds each). None may have drafted: only requests without a grammar."""
        rows: list[list[torch.Tensor]] = [[] for _ in drafted]
        redone = [0] * len(drafted)  # draft tokens each matcher has accepted again
        rolled = 0
        try:
            for req, state in drafted:
                state.matcher.rollback(req.num_draft)
                rolled += 1
            for j in range(max((req.num_draft for req, _ in drafted), default=0)):
                active = [i for i, (req, _) in enumerate(drafted) if req.num_draft > j]
                masks = self.backend.fill_masks([drafted[i][1].matcher for i in active])
                for k, i in enumerate(active):
                    req, state = drafted[i]
                    rows[i].append(masks[k : k + 1])
                    state.matcher.accept([req.output_ids[len(req.output_ids) - req.num_draft + j]])
                    redone[i] += 1
        finally:  # each matcher is after its whole output again, even if a fill failed
            for i, (req, state) in enumerate(drafted[:rolled]):
                rest = req.num_draft - redone[i]
                if rest:
                    state.matcher.accept(req.output_ids[len(req.output_ids) - rest :])
        return [torch.cat(r) for r in rows]


def _closes(req: Req, spec: GrammarSpec | None = None) -> bool:
    """Whether req's output gets budget-aware closing: JSON schemas, unless turned off."""
    spec = spec or GrammarSpec.from_params(req.params)
    return req.params.close_on_length and spec is not None and spec.kind == "json_schema"


def _grammar(req: Req) -> GrammarState:
    """req's grammar state; the manager made it, so it is a GrammarState."""
    assert isinstance(req.grammar, GrammarState)
    return req.grammar
