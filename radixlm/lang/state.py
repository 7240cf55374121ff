"""The `s` of a program: append with `+=`, read variables with `s["name"]`, fork and join."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from radixlm.lang.interpreter import ConcatForks, Executor
from radixlm.lang.ir import (
    Expr,
    ExprList,
    RoleBegin,
    RoleEnd,
    Text,
    VarScopeBegin,
    VarScopeEnd,
)


def as_expr(value: Expr | str) -> Expr:
    """A str becomes constant text; anything else must already be an expression."""
    if isinstance(value, str):
        return Text(value)
    if isinstance(value, Expr):
        return value
    if value is None:
        raise ValueError("cannot append None to a program state")
    raise TypeError(f"cannot append a {type(value).__name__} to a program state; use str(...)")


class ProgramState:
    """A running program's state. Appends return at once; reads wait for what they read."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.ret_value: Any = None  # what the program function returned

    def __iadd__(self, other: Expr | str) -> ProgramState:
        self.executor.submit(as_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.executor.variables

    def get_var(self, name: str) -> Any:
        """The value of a variable (waits for the gen or select that sets it)."""
        return self.executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        """Set a variable."""
        self.executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        """The meta_info of the gen or select that set `name` (server meta_info, or select scores)."""
        return self.executor.get_meta_info(name)

    def text(self) -> str:
        """The whole text so far (after everything appended has run)."""
        return self.executor.text_now()

    def messages(self) -> list[dict[str, Any]]:
        """The closed chat messages, in OpenAI's {"role", "content"} form."""
        self.executor.sync()
        return list(self.executor.messages)

    def pin(self, ttl_s: float = 300.0) -> dict[str, Any]:
        """Pin the text so far in the backend's cache for ttl_s seconds (a program's shared
        context: eviction skips it); waits for what was appended; returns the pin (`pin_id`,
        `tokens`, `expires_in_s`)."""
        return self.executor.backend.pin_prefix(self.executor.text_now(), ttl_s)

    def sync(self) -> None:
        """Wait until everything appended has run."""
        self.executor.sync()

    def error(self) -> BaseException | None:
        """The exception that stopped this state, if any."""
        self.executor.sync()
        return self.executor.error

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """`size` copies of this state that continue independently (and run concurrently)."""
        children = [ProgramState(e) for e in self.executor.fork(int(size))]
        return ProgramStateGroup(children, self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """A fork of one, joined back (its new variables gathered) when the block ends."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """With run(stream=True): pieces of the text (or of one variable) as they are generated."""
        if not self.executor.stream:
            yield self.text() if var_name is None else str(self.get_var(var_name))
            return
        yield from self.executor.text_iter(var_name)

    def system(self, expr: Expr | str | None = None) -> Any:
        """Append a system message holding `expr`, or without it, a `with` block that is one."""
        return self._role("system", expr)

    def user(self, expr: Expr | str | None = None) -> Any:
        """Append a user message holding `expr`, or without it, a `with` block that is one."""
        return self._role("user", expr)

    def assistant(self, expr: Expr | str | None = None) -> Any:
        """Append an assistant message holding `expr`, or without it, a `with` block that is one."""
        return self._role("assistant", expr)

    def _role(self, role: str, expr: Expr | str | None) -> Any:
        if expr is not None:
            self.executor.submit(ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)]))
            return None
        return self._role_block(role)

    @contextmanager
    def _role_block(self, role: str) -> Iterator[None]:
        self.executor.submit(RoleBegin(role))
        yield
        self.executor.submit(RoleEnd(role))

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Variable `name` receives all the text appended inside the block."""
        self.executor.submit(VarScopeBegin(name))
        yield
        self.executor.submit(VarScopeEnd(name))

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The forks of a state; `+=` appends to each, `join()` merges their results back."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `forks[i] += ...` assigns the (same) state back.
        if value is not self.states[i]:
            raise ValueError("fork states cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(
        self, other: Expr | str | Sequence[Expr | str] | Callable[[int], Expr | str]
    ) -> ProgramStateGroup:
        for i, state in enumerate(self.states):
            if isinstance(other, (Expr, str)):
                state += other
            elif isinstance(other, (list, tuple)):
                state += other[i]
            elif callable(other):
                state += other(i)
            else:
                raise TypeError(f"cannot append a {type(other).__name__} to forks")
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Merge back. gather_variable: each variable the forks created becomes a list (one value
        per fork) in the parent. concate_and_append: the forks' new text is appended to the parent."""
        if mode == "gather_variable":
            before = set(self.parent.executor.variables)
            gathered: dict[str, list[Any]] = {}
            for state in self.states:
                state.sync()
                for name, value in state.executor.variables.items():
                    if name not in before:
                        gathered.setdefault(name, []).append(value)
            for name, values in gathered.items():
                self.parent.executor.set_var(name, values)
        elif mode == "concate_and_append":
            self.parent.executor.submit(ConcatForks([s.executor for s in self.states]))
            self.parent.sync()
        else:
            raise ValueError(
                f"join mode must be gather_variable or concate_and_append, got {mode!r}"
            )
