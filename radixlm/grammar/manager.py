"""Structured output for the scheduler: compile off its thread, cache, mask, jump forward.

A request with a grammar waits here, never in the scheduler's queue, until its grammar is
compiled: the compile runs on one worker thread (llguidance drops the GIL while it builds a
matcher), so a slow grammar delays only its own request. A cached grammar is ready at once.

Jump-forward (SGLang's compressed FSM): after the sampled token is accepted, the text the
grammar forces next is appended to the request's output, and the next step feeds it in one extend
instead of one decode per token. The appended tokens are the tokenizer's own for the output text:

- The sampled token may merge with the forced text (`"` then `, "age"` is canonically `",` then
  ` "age"`), so the two are retokenized together. It has no KV yet and has not been sent, so
  replacing it costs nothing; tokens before it are context that never changes.
- llguidance's forced tokens stop short of forced text that could merge with what the model
  writes next: ` "` before a string value (the vocabulary has ` ""`, ` "$`, ...), ` ` before an
  integer (` -`). Its first token is appended too, as a *draft* (`Req.has_draft`), as in
  speculative decoding: it is fed with the rest, so the same forward also gives the logits of the
  position before it. The scheduler samples there (mask: the grammar before the draft) and asks
  `verify_draft`: the model's own token equal to the draft keeps it, and the token sampled after
  it is the step's token (a forward pass saved); another token replaces it (the draft's KV slot
  is freed; it is private, as a draft never enters the radix tree) and the sample after the
  draft is dropped, which costs what decoding without jump-forward costs. Either way the output
  is what the model writes one token at a time, so greedy text is the same as without
  jump-forward. A draft is sent once verified, or when the request finishes with it (it is
  forced text, tokenized as the output ends); an aborted request drops it.
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

    from radixlm.core.request import Req

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

    def fill_masks(self, reqs: Sequence[Req], drafted: Sequence[Req] = ()) -> torch.Tensor | None:
        """Allowed next tokens of a batch about to be sampled: bool [len(drafted) + len(reqs), V],
        None if no row has a grammar. The first rows are where each drafted request's draft was
        fed (the grammar before the draft), then the rows after all of each req's output_ids."""
        matchers = [r.grammar for r in reqs]
        if not drafted:
            return None if all(m is None for m in matchers) else self.backend.fill_masks(matchers)
        import torch  # here: the frontend imports this package and must not load torch

        before = self._masks_before_drafts(drafted)
        return torch.cat([before, self.backend.fill_masks(matchers)])

    def _masks_before_drafts(self, drafted: Sequence[Req]) -> torch.Tensor:
        """Each matcher steps back over its request's draft for one batched fill, then accepts
        it again (microseconds each)."""
        matchers = []
        for r in drafted:
            assert r.grammar is not None and r.has_draft
            r.grammar.rollback(1)
            matchers.append(r.grammar)
        masks = self.backend.fill_masks(matchers)
        for r, m in zip(drafted, matchers, strict=True):
            m.accept(r.output_ids[-1:])
        return masks

    def start(self, req: Req, context_len: int) -> list[int]:
        """Before the first forward: append the forced start of the output (`{"name":`) and a
        draft (` "`); returns the tokens to send now (all but the draft)."""
        if not self._may_jump(req):
            return []
        return self._jump(req, 0, context_len)

    def verify_draft(self, req: Req, token: int) -> bool:
        """Settle req's draft (its last output token) with the token the model sampled where the
        draft was fed: True if they agree; otherwise the draft leaves the output and the matcher
        (the caller frees its KV slot)."""
        assert req.grammar is not None and req.has_draft
        req.has_draft = False
        if token == req.output_ids[-1]:
            return True
        req.output_ids.pop()
        req.grammar.rollback(1)
        return False

    def advance(self, req: Req, context_len: int) -> list[int]:
        """Accept the token just sampled (the last of req.output_ids), then jump forward.

        Returns this step's new output tokens: the sampled one (possibly retokenized with the
        forced text after it) and the forced ones; a draft after them is not among them. A
        rejected token leaves req.grammar.error set.
        """
        matcher = req.grammar
        assert matcher is not None and not req.has_draft
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
        not yet run nor sent), retokenizing the two together, then a draft of the forced text
        that llguidance's forced tokens hold back; returns the tokens before the draft."""
        matcher = req.grammar
        assert matcher is not None
        keep = len(req.output_ids) - num_pending
        pending = req.output_ids[keep:]
        room = min(req.remaining_new_tokens, context_len - req.seq_len)
        forced_text = matcher.forced_bytes() if room > 0 else b""
        if not forced_text:
            return pending
        context = self._context(req, keep)
        joined = pending + matcher.forced_tokens()
        final = self.backend.retokenize(context, joined) or joined  # whatever the model writes next
        full = self.backend.retokenize(context, pending, forced_text)  # as if nothing followed
        draft = full[len(final) : len(final) + 1] if full and full[: len(final)] == final else []
        tokens = (final + draft)[: num_pending + room]
        num_final = min(len(final), len(tokens))
        same = _common_prefix_len(tokens, pending)
        matcher.rollback(num_pending - same)
        if matcher.num_valid(tokens[same:]) < len(tokens) - same:
            tokens, num_final = pending, num_pending  # (not expected: the same text) no jump
        matcher.accept(tokens[same:])
        req.output_ids[keep:] = tokens
        req.has_draft = len(tokens) > num_final
        return tokens[:num_final]

    @staticmethod
    def _context(req: Req, keep: int) -> list[int]:
        """The last few tokens before output position keep (prompt tokens if the output is short)."""
        tail = req.output_ids[max(0, keep - _CONTEXT_TOKENS) : keep]
        if len(tail) < _CONTEXT_TOKENS:
            tail = req.input_ids[len(tail) - _CONTEXT_TOKENS :] + tail
        return tail


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
