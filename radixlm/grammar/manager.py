"""Structured output for the scheduler: compile off its thread, cache, mask, jump forward.

A request with a grammar waits here, never in the scheduler's queue, until its grammar is
compiled: the compile runs on one worker thread (llguidance drops the GIL while it builds a
matcher), so a slow grammar delays only its own request. A cached grammar is ready at once.

Jump-forward (SGLang's compressed FSM): after the sampled token is accepted, the tokens the
grammar forces next are appended to the request's output, and the next step feeds them in one
extend instead of one decode each. The forced tokens are llguidance's, which stop short of any
tail that could merge with what the model writes next. The left edge is the sampled token: it may
merge with the forced text (`"` then `, "age"` is canonically `",` then ` "age"`), so the two are
retokenized together. That token has no KV yet and has not been sent, so replacing it costs
nothing; tokens before it are context that is never changed (no KV or stream rollback needed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from radixlm.grammar.base import GrammarBackend, GrammarSpec
from radixlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

    from radixlm.scheduler.request import Req

# Tokens before a jump that retokenization reads as context; they are never changed.
_CONTEXT_TOKENS = 2
# How long a scheduler with nothing else to do waits for a compile before reading its inbox.
_IDLE_WAIT_S = 0.01


def validate_spec(spec: GrammarSpec) -> None:
    """ValueError naming the problem if spec is not a valid regex / JSON schema / EBNF grammar."""
    from radixlm.grammar.llguidance_grammar import validate_grammar

    validate_grammar(spec)


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
    """The scheduler's structured-output helper; the backend is built on first use (~1 s)."""

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
            req.grammar = self.backend.matcher(compiled)
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

    def poll(self, block: bool = False) -> tuple[list[Req], list[tuple[Req, str]]]:
        """Requests whose grammar is ready (req.grammar set), and those whose compile failed with
        the message why; `block` waits a little for a compile first (when idle otherwise)."""
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
                req.grammar = self.backend.matcher(future.result())
                ready.append(req)
            except Exception as e:  # a bad grammar (or a backend bug) ends this request only
                failed.append((req, str(e) or type(e).__name__))
        self._compiling = compiling
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

    def fill_masks(self, reqs: Sequence[Req]) -> torch.Tensor | None:
        """Allowed next tokens of a batch about to be sampled: bool [B, V]; None if no row has a
        grammar. Matchers are already past every token in their request's output_ids."""
        matchers = [r.grammar for r in reqs]
        if all(m is None for m in matchers):
            return None
        return self.backend.fill_masks(matchers)

    def start(self, req: Req, context_len: int) -> list[int]:
        """Before the first forward: append the forced start of the output (`{"name":`);
        returns the tokens appended."""
        if not self._may_jump(req):
            return []
        return self._jump(req, 0, context_len)

    def advance(self, req: Req, context_len: int) -> list[int]:
        """Accept the token just sampled (the last of req.output_ids), then jump forward.

        Returns this step's new output tokens: the sampled one (possibly retokenized with the
        forced text after it) and the forced ones. A rejected token leaves req.grammar.error set.
        """
        matcher = req.grammar
        assert matcher is not None
        token = req.output_ids[-1]
        if not matcher.accept([token]) or matcher.is_terminated or not self._may_jump(req):
            return [token]
        return self._jump(req, 1, context_len)

    def _may_jump(self, req: Req) -> bool:
        # Forced tokens are never sampled, so they have no logprobs to report; and stop strings
        # are only looked for in the last few tokens of each step, which a long jump could pass.
        p = req.params
        return self.jump_forward and not req.return_logprob and not (p.stop or p.stop_regex)

    def _jump(self, req: Req, num_pending: int, context_len: int) -> list[int]:
        """Append the forced continuation after the last num_pending output tokens (accepted,
        not yet run nor sent), retokenizing the two together; returns those tokens now."""
        matcher = req.grammar
        assert matcher is not None
        keep = len(req.output_ids) - num_pending
        pending = req.output_ids[keep:]
        room = min(req.remaining_new_tokens, context_len - req.seq_len)
        forced = matcher.forced_tokens()[: max(room, 0)]
        if not forced:
            return pending
        tokens = pending + forced
        retokenized = self.backend.retokenize(self._context(req, keep), tokens)
        if retokenized is not None and retokenized != tokens:
            retokenized = retokenized[: num_pending + room]
            matcher.rollback(num_pending)
            if matcher.num_valid(retokenized) == len(retokenized):
                tokens = retokenized
            matcher.accept(tokens)
        else:
            matcher.accept(forced)
        req.output_ids[keep:] = tokens
        return tokens

    @staticmethod
    def _context(req: Req, keep: int) -> list[int]:
        """The last few tokens before output position keep (prompt tokens if the output is short)."""
        tail = req.output_ids[max(0, keep - _CONTEXT_TOKENS) : keep]
        if len(tail) < _CONTEXT_TOKENS:
            tail = req.input_ids[len(tail) - _CONTEXT_TOKENS :] + tail
        return tail
