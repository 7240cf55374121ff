"""The language's public names, with SGLang's signatures: `function`, `gen`, `select`, roles."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from radixlm.lang.choices import ChoicesMethod, token_length_normalized
from radixlm.lang.ir import (
    Expr,
    ExprList,
    Gen,
    GenParams,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    dtype_name,
    stop_tuple,
)
from radixlm.lang.program import SglFunction, as_backend, get_default_backend
from radixlm.lang.state import as_expr


@overload
def function(func: Callable[..., Any], num_api_spec_tokens: int | None = None) -> SglFunction: ...
@overload
def function(
    func: None = None, num_api_spec_tokens: int | None = None
) -> Callable[[Callable[..., Any]], SglFunction]: ...
def function(
    func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None
) -> SglFunction | Callable[[Callable[..., Any]], SglFunction]:
    """Make a program of `func(s, ...)`: `@function` or `@function(num_api_spec_tokens=K)`.

    With `num_api_spec_tokens`, OpenAI-API backends speculate: a completion model generates K
    tokens ahead once for several gens; a chat model answers a whole assistant turn in one call.
    """
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    repetition_penalty: float | None = None,
) -> Expr:
    """Generate into variable `name`. Unset arguments inherit run()'s defaults; `choices` makes it
    a select; `dtype` (int, float, str, bool) constrains the text with a regex."""
    if choices:
        return select(name, choices, 0.0 if temperature is None else temperature, choices_method)
    if regex is not None:
        re.compile(regex)  # fail here, with the program's line in the traceback
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    params = GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        n=n,
        stop=stop_tuple(stop),
        stop_token_ids=tuple(stop_token_ids) if stop_token_ids is not None else None,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        regex=regex,
        json_schema=json_schema,
        dtype=dtype_name(dtype),
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )
    return Gen(name, params)


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Expr:
    """An integer: gen(dtype=int), which ends at a space or newline."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Expr:
    """A double-quoted string: gen(dtype=str)."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesMethod | None = None,
) -> Expr:
    """Append whichever of `choices` the model finds most likely (token_length_normalized by
    default; also greedy_token_selection, unconditional_likelihood_normalized)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings")
    if temperature > 1e-5:
        raise ValueError("select picks the best-scored choice; temperature must be 0")
    return Select(name, list(choices), choices_method or token_length_normalized, temperature)


def image(path: str) -> Expr:
    """Append the image file at `path` (for LLaVA-style models): the model's image token goes
    into the text and the image, as base64, goes with every later model call, so the server
    needs no access to the file. Forks share it (and its cached K/V)."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"image({path!r}): cannot read the file: {e}") from e
    return Image(base64.b64encode(data).decode("ascii"))


def _role(role: str, expr: Expr | str | None) -> ExprList:
    body = [] if expr is None else [as_expr(expr)]
    return ExprList([RoleBegin(role), *body, RoleEnd(role)])


def system(expr: Expr | str | None = None) -> ExprList:
    """A system message holding `expr`."""
    return _role("system", expr)


def user(expr: Expr | str | None = None) -> ExprList:
    """A user message holding `expr`."""
    return _role("user", expr)


def assistant(expr: Expr | str | None = None) -> ExprList:
    """An assistant message holding `expr`."""
    return _role("assistant", expr)


def system_begin() -> Expr:
    """Open a system message."""
    return RoleBegin("system")


def system_end() -> Expr:
    """Close the system message."""
    return RoleEnd("system")


def user_begin() -> Expr:
    """Open a user message."""
    return RoleBegin("user")


def user_end() -> Expr:
    """Close the user message."""
    return RoleEnd("user")


def assistant_begin() -> Expr:
    """Open an assistant message."""
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    """Close the assistant message."""
    return RoleEnd("assistant")


def flush_cache(backend: Any = None) -> bool:
    """Drop the backend's prefix cache (the default backend's if none is given)."""
    if backend is None and get_default_backend() is None:
        return False
    return as_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any]:
    """What the backend's server says about itself."""
    return as_backend(backend).get_server_info()
