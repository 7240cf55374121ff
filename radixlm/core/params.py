"""Per-request sampling parameters with SGLang's key names, defaults and validation."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

# Below this temperature a request is greedy (SGLang's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-6


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops; validated on construction."""

    max_new_tokens: int = 128  # 0 = prefill only
    min_new_tokens: int = 0
    temperature: float = 1.0  # < GREEDY_TEMPERATURE means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    repetition_penalty: float = 1.0  # HF/CTRL semantics, over prompt + output tokens
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # SGLang's frontend sends this key in every request (usually empty); the stop checker owns it.
    stop_regex: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # With json_schema: a document that max_new_tokens (or the context) would cut is ended with
    # its shortest completion instead, so it always parses; the finish reason still says length.
    close_on_length: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            _fail(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            _fail(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            _fail(f"temperature must be a finite number >= 0, got {self.temperature:g}")
        if not 0.0 < self.top_p <= 1.0:
            _fail(f"top_p must be in (0, 1], got {self.top_p:g}")
        if self.top_k < -1:
            _fail(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            _fail(f"min_p must be in [0, 1], got {self.min_p:g}")
        for key in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, key)
            if not -2.0 <= value <= 2.0:
                _fail(f"{key} must be in [-2, 2], got {value:g}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            _fail(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty:g}")
        if any(not s for s in self.stop):
            _fail("stop must not contain empty strings")
        for token_id in self.stop_token_ids:
            if token_id < 0:
                _fail(f"stop_token_ids must be >= 0, got {token_id}")
        for pattern in self.stop_regex:
            if not pattern:
                _fail("stop_regex must not contain empty patterns")
            try:
                re.compile(pattern)
            except re.error as e:
                _fail(f"stop_regex {pattern!r} is not a valid regular expression: {e}")
        if self.n < 1:
            _fail(f"n must be >= 1, got {self.n}")
        if sum(g is not None for g in (self.regex, self.json_schema, self.ebnf)) > 1:
            _fail("at most one of regex, json_schema, ebnf may be set")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Parse the `sampling_params` object of a request; raises ValueError naming the bad key."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            _fail(f"sampling_params must be an object, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            convert = _CONVERTERS.get(key)
            if convert is None:
                _fail(f"unknown sampling parameter {key!r}")
            kwargs[key] = convert(key, value)
        return cls(**kwargs)

    @property
    def is_greedy(self) -> bool:
        """Whether the request always takes the most likely token."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int) -> None:
        """Check the fields that depend on the model's vocabulary."""
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                _fail(f"stop_token_ids must be in [0, {vocab_size}), got {token_id}")


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(key: str, value: Any) -> int:
    # JSON clients (and JavaScript) may send 16.0 for 16; a fractional value is a client bug.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _fail(f"{key} must be an integer, got {_describe(value)}")


def _optional_int(key: str, value: Any) -> int | None:
    return None if value is None else _int(key, value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
        if not math.isnan(result):
            return result
    return _fail(f"{key} must be a number, got {_describe(value)}")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return _fail(f"{key} must be true or false, got {_describe(value)}")


def _optional_str(key: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return _fail(f"{key} must be a string, got {_describe(value)}")


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    # None and [] both mean "none": SGLang's frontend sends [] and OpenAI-style clients send null.
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        _fail(f"{key} must be a string or a list of strings, got {_describe(value)}")
    return tuple(items)


def _token_ids(key: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else (value,)
    ids = [_int(key, v) for v in items]
    return tuple(dict.fromkeys(ids))  # duplicates are harmless; drop them, keep order


def _json_schema(key: str, value: Any) -> str | None:
    if isinstance(value, dict):
        return json.dumps(value)
    return _optional_str(key, value)


_CONVERTERS: Mapping[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _int,
    "min_new_tokens": _int,
    "temperature": _float,
    "top_p": _float,
    "top_k": _int,
    "min_p": _float,
    "frequency_penalty": _float,
    "presence_penalty": _float,
    "repetition_penalty": _float,
    "stop": _str_list,
    "stop_token_ids": _token_ids,
    "stop_regex": _str_list,
    "ignore_eos": _bool,
    "n": _int,
    "sampling_seed": _optional_int,
    "skip_special_tokens": _bool,
    "spaces_between_special_tokens": _bool,
    "no_stop_trim": _bool,
    "regex": _optional_str,
    "json_schema": _json_schema,
    "ebnf": _optional_str,
    "close_on_length": _bool,
}
