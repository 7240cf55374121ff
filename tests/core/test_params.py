"""SamplingParams: SGLang's keys and defaults, parsing of JSON values, and validation messages."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.core.params import SamplingParams


def test_defaults_match_sglang() -> None:
    p = SamplingParams()
    assert SamplingParams.from_dict(None) == p
    assert SamplingParams.from_dict({}) == p
    assert (p.max_new_tokens, p.min_new_tokens, p.n) == (128, 0, 1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.stop_regex) == ((), (), ())
    assert not p.ignore_eos and not p.no_stop_trim
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.sampling_seed is None and p.regex is None and p.json_schema is None
    assert p.ebnf is None and p.close_on_length
    assert not p.is_greedy


def test_every_field_is_a_key_of_from_dict() -> None:
    defaults = SamplingParams()
    d = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(SamplingParams)}
    assert SamplingParams.from_dict(d) == defaults


def test_sglang_frontend_payload_is_accepted() -> None:
    # What SglSamplingParams.to_srt_kwargs() sends for gen(..., temperature=0, dtype=int).
    payload = {
        "max_new_tokens": 16,
        "min_new_tokens": 0,
        "n": 1,
        "stop": [" ", "\n"],
        "stop_token_ids": [],
        "stop_regex": [],
        "temperature": 0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "ignore_eos": False,
        "regex": r"[-+]?[0-9]+[ \n]*",
        "json_schema": None,
    }
    p = SamplingParams.from_dict(payload)
    assert p.stop == (" ", "\n")
    assert p.is_greedy
    assert p.regex == payload["regex"]


def test_value_conversions() -> None:
    p = SamplingParams.from_dict(
        {
            "max_new_tokens": 16.0,
            "temperature": 1,
            "stop": "###",
            "stop_token_ids": 7,
            "stop_regex": r"\d+$",
            "sampling_seed": 42.0,
        }
    )
    assert p.max_new_tokens == 16 and isinstance(p.max_new_tokens, int)
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ("###",)
    assert p.stop_token_ids == (7,)
    assert p.stop_regex == (r"\d+$",)
    assert p.sampling_seed == 42
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ("a", "b")
    p = SamplingParams.from_dict({"stop": None, "stop_token_ids": [3, 1, 3]})
    assert p.stop == () and p.stop_token_ids == (3, 1)
    assert SamplingParams.from_dict({"stop_token_ids": None}).stop_token_ids == ()
    assert not SamplingParams.from_dict({"close_on_length": False}).close_on_length


def test_json_schema_object_is_serialised() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    p = SamplingParams.from_dict({"json_schema": schema})
    assert isinstance(p.json_schema, str)
    assert json.loads(p.json_schema) == schema
    assert SamplingParams.from_dict({"json_schema": '{"type": "integer"}'}).json_schema == (
        '{"type": "integer"}'
    )


BAD_VALUES: list[tuple[str, Any, str]] = [
    ("max_new_tokens", -1, "max_new_tokens must be >= 0, got -1"),
    ("max_new_tokens", "abc", "max_new_tokens must be an integer"),
    ("max_new_tokens", None, "max_new_tokens must be an integer"),
    ("max_new_tokens", 16.5, "max_new_tokens must be an integer"),
    ("max_new_tokens", True, "max_new_tokens must be an integer"),
    ("max_new_tokens", float("inf"), "max_new_tokens must be an integer"),
    ("min_new_tokens", -1, "min_new_tokens must be in [0, max_new_tokens=128]"),
    ("min_new_tokens", 129, "min_new_tokens must be in [0, max_new_tokens=128], got 129"),
    ("temperature", -0.5, "temperature must be a finite number >= 0, got -0.5"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("temperature", "hot", "temperature must be a number"),
    ("temperature", None, "temperature must be a number"),
    ("temperature", False, "temperature must be a number"),
    ("top_p", 0, "top_p must be in (0, 1], got 0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_k", -2, "top_k must be -1 or 0 (off) or >= 1, got -2"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
    ("min_p", 1.1, "min_p must be in [0, 1]"),
    ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2], got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
    ("presence_penalty", -2.01, "presence_penalty must be in [-2, 2]"),
    ("repetition_penalty", 0, "repetition_penalty must be in (0, 2], got 0"),
    ("repetition_penalty", 2.5, "repetition_penalty must be in (0, 2]"),
    ("stop", "", "stop must not contain empty strings"),
    ("stop", ["ok", ""], "stop must not contain empty strings"),
    ("stop", 5, "stop must be a string or a list of strings"),
    ("stop", ["a", 1], "stop must be a string or a list of strings"),
    ("stop_token_ids", [1, -1], "stop_token_ids must be >= 0, got -1"),
    ("stop_token_ids", ["1"], "stop_token_ids must be an integer"),
    ("stop_regex", ["("], "stop_regex '(' is not a valid regular expression"),
    ("stop_regex", [""], "stop_regex must not contain empty patterns"),
    ("ignore_eos", 1, "ignore_eos must be true or false, got 1"),
    ("ignore_eos", "true", "ignore_eos must be true or false"),
    ("ignore_eos", None, "ignore_eos must be true or false"),
    ("skip_special_tokens", 0, "skip_special_tokens must be true or false"),
    ("spaces_between_special_tokens", None, "spaces_between_special_tokens must be true or"),
    ("no_stop_trim", "no", "no_stop_trim must be true or false"),
    ("n", 0, "n must be >= 1, got 0"),
    ("sampling_seed", "7", "sampling_seed must be an integer"),
    ("sampling_seed", 1.5, "sampling_seed must be an integer"),
    ("regex", 5, "regex must be a string"),
    ("json_schema", [1], "json_schema must be a string"),
    ("ebnf", {"a": 1}, "ebnf must be a string"),
    ("close_on_length", "yes", "close_on_length must be true or false"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_bad_value_is_rejected_naming_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({key: value})
    assert message in str(info.value)


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sampling parameter 'foo'"):
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})


def test_sampling_params_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="sampling_params must be an object"):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "grammars",
    [
        {"regex": "a+", "json_schema": "{}"},
        {"regex": "a+", "ebnf": 'root ::= "a"'},
        {"json_schema": {"type": "string"}, "ebnf": 'root ::= "a"'},
    ],
)
def test_at_most_one_grammar(grammars: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="at most one of regex, json_schema, ebnf"):
        SamplingParams.from_dict(grammars)


def test_min_new_tokens_may_equal_max_new_tokens() -> None:
    assert SamplingParams.from_dict({"max_new_tokens": 4, "min_new_tokens": 4}).min_new_tokens == 4
    assert SamplingParams.from_dict({"max_new_tokens": 0}).max_new_tokens == 0


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)


def test_validate_against_vocab_size() -> None:
    SamplingParams(stop_token_ids=(0, 99)).validate(vocab_size=100)
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 100\), got 100"):
        SamplingParams(stop_token_ids=(5, 100)).validate(vocab_size=100)


@pytest.mark.parametrize(
    ("params", "greedy"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 5e-7}, True),
        ({"temperature": 1e-5}, False),
        ({"top_k": 1}, True),
        ({"top_k": 2}, False),
        ({"top_k": 0}, False),
        ({}, False),
    ],
)
def test_is_greedy(params: dict[str, Any], greedy: bool) -> None:
    assert SamplingParams.from_dict(params).is_greedy is greedy


def test_frozen_and_hashable() -> None:
    p = SamplingParams.from_dict({"stop": ["x"], "temperature": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("x",), temperature=0.5))
    assert dataclasses.replace(p, sampling_seed=3).sampling_seed == 3


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = st.sampled_from([f.name for f in dataclasses.fields(SamplingParams)] + ["foo"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_KEYS, _JSON, max_size=4))
def test_any_json_input_is_parsed_or_rejected_with_value_error(d: dict[str, Any]) -> None:
    try:
        p = SamplingParams.from_dict(d)
    except ValueError:
        return
    hash(p)  # everything stored is immutable
    assert (
        SamplingParams.from_dict(
            {f.name: getattr(p, f.name) for f in dataclasses.fields(SamplingParams)}
        )
        == p
    )
