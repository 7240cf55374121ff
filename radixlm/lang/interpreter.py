"""Executes a program's expressions against a backend, one state at a time, forks in parallel."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.ir import (
    CommitPrefix,
    Expr,
    Gen,
    GenParams,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    flatten,
    variable_names,
)

SPEC_MAX_TRIES = 3  # chat-model speculation: sampled attempts before giving up on the format


# Defined here, not in ir.py, because it holds live executors: ir.py stays plain data that
# imports nothing from the interpreter.
@dataclass(eq=False)
class ConcatForks(Expr):
    """Append the text each fork added after the fork point (join mode concate_and_append)."""

    forks: list[Executor] = field(default_factory=list)


class Executor:
    """The state of one program (or fork): its text, chat messages and variables.

    A fork's `submit` queues expressions and returns at once; a thread started while the queue is
    non-empty executes them in order. So a program that feeds several forks gets their generations
    running concurrently, and reading a variable waits only for the expression that sets it. A
    program's root state is `inline`: expressions run in the caller, which saves two thread
    hand-offs per call where there is nothing to overlap.
    """

    def __init__(
        self,
        backend: Backend,
        defaults: GenParams,
        *,
        stream: bool = False,
        spec_tokens: int | None = None,
        inline: bool = False,
    ) -> None:
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.spec_tokens = spec_tokens
        self.inline = inline
        self.text = ""
        self.messages: list[dict[str, Any]] = []
        self.images: list[str] = []  # base64 of each image token in text, in order
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.program_done = False  # the program function returned (streaming readers stop)
        self.fork_start = 0  # len(text) when this fork was made
        self._cond = threading.Condition()
        self._todo: deque[Expr] = deque()
        self._busy = False
        self._pending: Counter[str] = Counter()  # variables submitted but not yet set
        self._role: str | None = None
        self._role_start = 0
        self._scopes: dict[str, int] = {}
        self._speculated = ""  # completion-model speculation: generated text not yet consumed
        self._speculated_to_eos = False  # ... which ends where the model itself stopped
        self._spec_segments: list[Text | Gen] | None = None  # chat speculation in an assistant turn

    # ---- the program side ------------------------------------------------------------------

    def submit(self, expr: Expr) -> None:
        """Queue an expression; returns before it runs (unless inline)."""
        items = flatten(expr)
        with self._cond:
            if self.error is not None:
                return  # a failed state runs nothing more; readers see the error
            self._pending.update(variable_names(expr))
            self._todo.extend(items)
            if self._busy:
                return
            self._busy = True
        if self.inline:
            self._drain()
        else:
            threading.Thread(target=self._drain, name="radixlm-lang", daemon=True).start()

    def sync(self) -> None:
        """Wait until every queued expression has run."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)

    def get_var(self, name: str) -> Any:
        """A variable's value, once the expression that sets it has run."""
        with self._cond:
            if self.inline and not self._busy and self._pending[name] > 0:
                # Nothing is running that could set it: chat speculation defers a gen to the end
                # of its assistant turn.
                raise RuntimeError(f"{name!r} is set when its assistant turn ends; read it after")
            self._cond.wait_for(lambda: self._pending[name] <= 0)
            if name in self.variables:
                return self.variables[name]
            if self.error is not None:
                raise self.error
        raise KeyError(f"the program has no variable {name!r}")

    def get_meta_info(self, name: str) -> Any:
        """The meta_info of the gen or select that set `name` (None if it has none)."""
        self.get_var(name)
        return self.meta_info.get(name)

    def set_var(self, name: str, value: Any, meta: Any = None) -> None:
        """Set a variable and wake its readers."""
        with self._cond:
            self.variables[name] = value
            if meta is not None:
                self.meta_info[name] = meta
            if self._pending[name] > 0:
                self._pending[name] -= 1
            self._cond.notify_all()

    def fork(self, size: int) -> list[Executor]:
        """Child states that start from this one's text; the shared text is prefilled once first."""
        if size > 1 and self.text_now():
            self.submit(CommitPrefix())
        self.sync()
        children = []
        for _ in range(size):
            child = Executor(
                self.backend, self.defaults, stream=self.stream, spec_tokens=self.spec_tokens
            )
            child.text, child.messages = self.text, list(self.messages)
            child.images = list(self.images)
            child.variables = dict(self.variables)
            child._role, child._role_start = self._role, self._role_start
            child._speculated = self._speculated
            child.fork_start = len(self.text)
            children.append(child)
        return children

    def text_now(self) -> str:
        """The text after the expressions queued so far have run."""
        self.sync()
        return self.text

    def finish_program(self, error: BaseException | None = None) -> None:
        """Mark the program function as returned (or failed), which ends streaming readers."""
        with self._cond:
            self.program_done = True
            if error is not None and self.error is None:
                self.error = error
            self._cond.notify_all()

    def text_iter(self, name: str | None) -> Iterator[str]:
        """Pieces of the text (or of variable `name`) as they are generated."""
        seen = 0

        def news() -> bool:
            return len(self._streamed(name)) > seen or self._stream_done(name)

        while True:
            with self._cond:
                self._cond.wait_for(news)
                value = self._streamed(name)
                done = self._stream_done(name)
            if len(value) > seen:
                yield value[seen:]
                seen = len(value)
            if done:
                return

    def _streamed(self, name: str | None) -> str:
        return self.text if name is None else str(self.variables.get(name, ""))

    def _stream_done(self, name: str | None) -> bool:
        ended = self.error is not None or (self.program_done and not self._busy)
        if name is None:
            return ended
        return self._pending[name] <= 0 and (name in self.variables or ended)

    # ---- the execution side -----------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._todo:
                    self._busy = False
                    self._cond.notify_all()
                    return
                expr = self._todo.popleft()
            try:
                self._execute(expr)
            except BaseException as e:
                with self._cond:
                    self.error = e
                    self._todo.clear()
                    self._pending.clear()
                    self._busy = False
                    self._cond.notify_all()
                if self.inline:
                    raise
                return

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._fill(expr.value)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            decision = self.backend.select(self._prompt(), expr.choices, expr.choices_method)
            self._append(decision.decision)
            if expr.name is not None:
                self.set_var(expr.name, decision.decision, decision.meta_info)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self._scopes[expr.name] = len(self.text)
        elif isinstance(expr, VarScopeEnd):
            self.set_var(expr.name, self.text[self._scopes.pop(expr.name) :])
        elif isinstance(expr, Image):
            self._image(expr)
        elif isinstance(expr, CommitPrefix):
            if self.images:
                self.backend.cache_prefix(self.text, self.images)
            else:  # backends written before images take the text alone
                self.backend.cache_prefix(self.text)
        elif isinstance(expr, ConcatForks):
            for child in expr.forks:
                child.sync()
            self._fill("".join(c.text[c.fork_start :] for c in expr.forks))
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _prompt(self) -> Prompt:
        return Prompt(self.text, list(self.messages), list(self.images))

    def _image(self, image: Image) -> None:
        token = self.backend.image_token
        if token is None:
            raise ValueError("image(): this backend's model takes no images (text only)")
        if self._spec_segments is not None:
            raise ValueError("image(): not supported inside a speculated assistant turn")
        self._speculated = ""
        with self._cond:
            self.images.append(image.data)
            self.text += token
            self._cond.notify_all()

    def _append(self, text: str) -> None:
        with self._cond:
            self.text += text
            self._cond.notify_all()

    def _fill(self, value: str, prefix: bool = False) -> None:
        if self._spec_segments is not None and not prefix:
            self._spec_segments.append(Text(value))
            return
        # Constant text that the speculated continuation predicted keeps the speculation alive.
        if self._speculated.startswith(value):
            self._speculated = self._speculated[len(value) :]
        else:
            self._speculated = ""
        self._append(value)

    def _gen(self, gen: Gen) -> None:
        params = self.defaults.merged(gen.params).resolved()
        if self._spec_segments is not None:
            self._spec_segments.append(replace(gen, params=params))
            return  # its variable is set when the assistant turn ends
        if self.backend.is_chat_model and (
            self._role != "assistant" or self.text[self._role_start :]
        ):
            raise RuntimeError(
                "a chat model can only generate a whole assistant message: put gen right after "
                "assistant_begin(), or turn on API speculative execution with "
                "@function(num_api_spec_tokens=...)"
            )
        comp: str | list[str]
        meta: Any = {}
        if self.stream and self.spec_tokens is None:
            comp = ""
            for piece, piece_meta in self.backend.generate_stream(self._prompt(), params):
                comp, meta = comp + piece, piece_meta
                with self._cond:
                    self.text += piece
                    if gen.name is not None:
                        self.variables[gen.name] = comp
                    self._cond.notify_all()
            if gen.name is not None:
                self.set_var(gen.name, comp, meta)
            return
        if self.spec_tokens is not None and not self.backend.is_chat_model:
            comp, meta = self._spec_gen(params)
        else:
            comp, meta = self.backend.generate(self._prompt(), params)
        self._append(comp[0] if isinstance(comp, list) else comp)
        if gen.name is not None:
            self.set_var(gen.name, comp, meta)

    def _spec_gen(self, params: GenParams) -> tuple[str, Any]:
        """Completion-model speculation: one call generates ahead; later gens whose stop string
        shows up in that text (after constant text that matches it) need no call of their own."""
        stops = params.stop or ()
        if not stops:  # without a stop string a gen cannot be cut out of the speculated text
            self._speculated = ""
            comp, meta = self.backend.generate(self._prompt(), params)
            return (comp[0] if isinstance(comp, list) else comp), meta
        meta = {}
        if not self._speculated:
            ahead = max(params.max_new_tokens or 0, self.spec_tokens or 0)
            ask = replace(params, max_new_tokens=ahead, stop=None, n=None)
            comp, meta = self.backend.generate(self._prompt(), ask)
            self._speculated = comp[0] if isinstance(comp, list) else comp
            self._speculated_to_eos = _stopped_by_model(meta)
        cuts = [p for s in stops if (p := self._speculated.find(s)) >= 0]
        if cuts:
            cut = min(cuts)
        elif self._speculated_to_eos:  # the model ended there: the gen would end there too
            cut = len(self._speculated)
        else:  # the speculation ran out before the gen ended: ask for the rest
            self._speculated = ""
            comp, meta = self.backend.generate(self._prompt(), params)
            return (comp[0] if isinstance(comp, list) else comp), meta
        value, self._speculated = self._speculated[:cut], self._speculated[cut:]
        return value, meta

    def _role_begin(self, role: str) -> None:
        if self._role is not None:
            raise RuntimeError(f"a {role!r} message cannot start inside a {self._role!r} message")
        prefix, _ = self.backend.chat_template.prefix_and_suffix(role, self.messages)
        self._role = role
        self._fill(prefix, prefix=True)
        self._role_start = len(self.text)
        if role == "assistant" and self.spec_tokens is not None and self.backend.is_chat_model:
            self._spec_segments = []

    def _role_end(self, role: str) -> None:
        if self._role != role:
            raise RuntimeError(f"{role}_end() without a matching {role}_begin()")
        if self._spec_segments is not None:
            self._run_chat_speculation()
        content = self.text[self._role_start :].lstrip()
        _, suffix = self.backend.chat_template.prefix_and_suffix(role, self.messages)
        self._role = None
        self._fill(suffix)
        self.messages.append({"role": role, "content": content})

    def _run_chat_speculation(self) -> None:
        """Chat-model speculation: the assistant turn's constant text and gens are answered by one
        call, whose reply is split at the constant text and the gens' stop strings."""
        segments, self._spec_segments = self._spec_segments or [], None
        gens = [s for s in segments if isinstance(s, Gen)]
        values: list[str] | None = [s.value for s in segments if isinstance(s, Text)]
        meta: Any = {}
        if gens:
            ask = replace(gens[0].params, max_new_tokens=self.spec_tokens, stop=None, n=None)
            # A greedy reply would only repeat itself; a sampled one may follow the format next time.
            tries = SPEC_MAX_TRIES if (ask.temperature or 0.0) > 0.0 else 1
            for _ in range(tries):
                comp, meta = self.backend.generate(self._prompt(), ask)
                reply = comp[0] if isinstance(comp, list) else comp
                values = match_segments(segments, reply)
                if values is not None:
                    break
            if values is None:
                raise RuntimeError(
                    f"API speculative execution failed: the reply {reply!r} does not follow the "
                    "assistant turn's constant text and stop strings"
                )
        assert values is not None
        for seg, value in zip(segments, values, strict=True):
            self._append(value)
            if isinstance(seg, Gen) and seg.name is not None:
                self.set_var(seg.name, value, meta)


def _stopped_by_model(meta: Any) -> bool:
    """Whether a generation ended on an end-of-sequence token (not a length limit)."""
    reason = meta.get("finish_reason") if isinstance(meta, dict) else None
    if isinstance(reason, dict):  # native: {"type": "stop", "matched": ...}
        reason = reason.get("type")
    return reason == "stop"


def match_segments(segments: list[Text | Gen], reply: str) -> list[str] | None:
    """Split a reply into the segments' texts: constants must match exactly; a gen ends at its
    first stop string (else at the next constant text, or the end). None if the reply differs."""
    out: list[str] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, Text):
            if not reply.startswith(seg.value):
                return None
            out.append(seg.value)
            reply = reply[len(seg.value) :]
            continue
        ends = list(seg.params.stop or ())
        following = segments[i + 1] if i + 1 < len(segments) else None
        if not ends and isinstance(following, Text) and following.value:
            ends = [following.value]
        cuts = [p for e in ends if (p := reply.find(e)) >= 0]
        if cuts:
            cut = min(cuts)
        elif following is None:
            cut = len(reply)
        else:
            return None
        out.append(reply[:cut])
        reply = reply[cut:]
    return out
