"""The program's expressions: what `s += ...` appends, as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixlm.lang.choices import ChoicesMethod

# SGLang's regexes for typed generation (`gen(dtype=int)`, `gen_int`, `gen_string`).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

_DTYPE_REGEX: dict[str, tuple[str, tuple[str, ...]]] = {
    # dtype -> (regex, stop strings added so a number ends at the first space or newline)
    "int": (REGEX_INT, (" ", "\n")),
    "float": (REGEX_FLOAT, (" ", "\n")),
    "str": (REGEX_STR, ()),
    "bool": (REGEX_BOOL, ()),
}


def dtype_name(dtype: type | str | None) -> str | None:
    """Normalise a gen dtype (int, "int", float, str, bool, ...) to its name; ValueError if unknown."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", "")
    name = "str" if name == "string" else name
    if name not in _DTYPE_REGEX:
        raise ValueError(f"gen dtype must be int, float, str or bool, got {dtype!r}")
    return name


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of a gen; None means "inherit" (from run()'s defaults, then the server's)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None
    dtype: str | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None

    def merged(self, override: GenParams) -> GenParams:
        """These values with every field that `override` sets replaced."""
        changes = {
            f.name: v for f in fields(override) if (v := getattr(override, f.name)) is not None
        }
        return replace(self, **changes)

    def resolved(self) -> GenParams:
        """Turn `dtype` into its regex and stop strings (dtype wins over an explicit regex)."""
        if self.dtype is None:
            return self
        regex, stops = _DTYPE_REGEX[self.dtype]
        return replace(self, regex=regex, stop=(*(self.stop or ()), *stops))

    def sampling_dict(self) -> dict[str, Any]:
        """The `sampling_params` object of a native /generate request (unset keys left out)."""
        keys = (
            "max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids", "temperature",
            "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
            "repetition_penalty", "ignore_eos", "regex", "json_schema",
        )  # fmt: skip
        out: dict[str, Any] = {}
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def logprob_dict(self) -> dict[str, Any]:
        """The request-level logprob options of a native /generate request (unset ones left out)."""
        keys = (
            "return_logprob",
            "logprob_start_len",
            "top_logprobs_num",
            "return_text_in_logprobs",
        )
        return {k: v for k in keys if (v := getattr(self, k)) is not None}


def stop_tuple(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A stop argument as a tuple (None stays None: "not set")."""
    if stop is None:
        return None
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Expr:
    """Something a program appends to its state; `a + b` builds a sequence."""

    def __add__(self, other: Expr | str) -> ExprList:
        return ExprList([*_items(self), *_items(other)])

    def __radd__(self, other: Expr | str) -> ExprList:
        return ExprList([*_items(other), *_items(self)])


def _items(x: Expr | str) -> list[Expr]:
    if isinstance(x, str):
        return [Text(x)]
    if isinstance(x, ExprList):
        return list(x.items)
    if isinstance(x, Expr):
        return [x]
    raise TypeError(f"cannot append a {type(x).__name__} to a program; use a str or an expression")


@dataclass(eq=False)
class ExprList(Expr):
    """A sequence of expressions, executed in order."""

    items: list[Expr]


@dataclass(eq=False)
class Text(Expr):
    """Constant text."""

    value: str


@dataclass(eq=False)
class Image(Expr):
    """An image, placed where the model's image token goes; `data` is the file's base64."""

    data: str = field(repr=False)


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable `name`."""

    name: str | None
    params: GenParams

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


@dataclass(eq=False)
class Select(Expr):
    """Append the most likely of `choices` and store it in variable `name`."""

    name: str | None
    choices: list[str]
    choices_method: ChoicesMethod
    temperature: float = 0.0


@dataclass(eq=False)
class RoleBegin(Expr):
    """Open a chat message of `role` (system, user or assistant)."""

    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    """Close the chat message of `role`."""

    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    """Start capturing the text appended to the state into variable `name`."""

    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    """Stop capturing: variable `name` holds the text appended since its VarScopeBegin."""

    name: str


@dataclass(eq=False)
class CommitPrefix(Expr):
    """Prefill the state's text once (max_new_tokens 0) so that forks share its KV cache."""


def flatten(expr: Expr) -> list[Expr]:
    """The expression as a flat sequence (ExprLists nest when programs compose them)."""
    if isinstance(expr, ExprList):
        return [leaf for e in expr.items for leaf in flatten(e)]
    return [expr]


def variable_names(expr: Expr) -> list[str]:
    """The variables an expression will set (their readers wait until they are set)."""
    if isinstance(expr, ExprList):
        return [n for e in expr.items for n in variable_names(e)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeEnd):
        return [expr.name]
    return []
