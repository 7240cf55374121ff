"""Structured output end to end on the embedded SmolLM2, with jump-forward on and off.

Every output must parse and validate (jsonschema / re.fullmatch) and end because its grammar
did. The reference for jump-forward is the same engine without it: wherever the plain greedy
run's tokens are the tokenizer's own tokenization of its text, the jump-forward run must write
the same text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from grammar_cases import PERSON_SCHEMA, REGEXES, SCHEMAS

from radixlm.engine.engine import Engine

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 96
TEMPERATURES = (0.0, 1.0)


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    key: str  # "json_schema" or "regex"
    spec: Any

    def params(self, temperature: float, seed: int) -> dict[str, Any]:
        spec = json.dumps(self.spec) if self.key == "json_schema" else self.spec
        return {
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": temperature,
            "sampling_seed": seed,
            self.key: spec,
        }

    def check(self, text: str) -> None:
        if self.key == "json_schema":
            jsonschema.validate(json.loads(text), self.spec)
        else:
            assert re.fullmatch(self.spec, text), text


CASES = [Case(n, p, "json_schema", s) for n, (p, s) in SCHEMAS.items()] + [
    Case(n, p, "regex", r) for n, (p, r) in REGEXES.items()
]


@dataclass
class Run:
    outputs: dict[str, dict[str, Any]]
    forward_passes: int


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[bool, Engine]]:
    """Jump-forward on (True) and off (False)."""
    with Engine(random_seed=0) as on, Engine(random_seed=0, disable_jump_forward=True) as off:
        yield {True: on, False: off}


@pytest.fixture(autouse=True)
def slots_have_one_owner(engines: dict[bool, Engine]) -> Iterator[None]:
    yield
    for engine in engines.values():
        engine.check_invariant()


@pytest.fixture(scope="module")
def runs(engines: dict[bool, Engine]) -> dict[tuple[bool, float], Run]:
    """Every case in one batch, per (jump_forward, temperature)."""
    result = {}
    for jump_forward, engine in engines.items():
        prompts = [chat(engine, c.prompt) for c in CASES]
        for temperature in TEMPERATURES:
            before = engine.get_stats()["num_forward_passes"]
            params = [c.params(temperature, seed=i) for i, c in enumerate(CASES)]
            outs = engine.generate(prompts, params)
            assert isinstance(outs, list)
            passes = engine.get_stats()["num_forward_passes"] - before
            result[jump_forward, temperature] = Run(
                {c.name: o for c, o in zip(CASES, outs, strict=True)}, passes
            )
            engine.check_invariant()
    return result


def chat(engine: Engine, prompt: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump", "plain"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_output_matches_its_grammar(
    runs: dict[tuple[bool, float], Run], case: Case, temperature: float, jump_forward: bool
) -> None:
    out = runs[jump_forward, temperature].outputs[case.name]
    case.check(out["text"])
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop", reason
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])


def test_greedy_text_is_the_same_with_and_without_jump_forward(
    runs: dict[tuple[bool, float], Run], engines: dict[bool, Engine]
) -> None:
    tokenizer = engines[False].tokenizer
    compared = []
    for case in CASES:
        plain = runs[False, 0.0].outputs[case.name]
        ids = [i for i in plain["output_ids"] if i not in tokenizer.eos_token_ids]
        if ids == tokenizer.encode(plain["text"], add_special_tokens=False):
            assert runs[True, 0.0].outputs[case.name]["text"] == plain["text"], case.name
            compared.append(case.name)
    assert len(compared) >= len(CASES) * 2 // 3, compared


PEOPLE = [("Alice Martin", 19, "Paris"), ("Deepak Rao", 40, "Mumbai"), ("Keiko Sato", 54, "Osaka")]


def test_json_extraction_is_the_same_text_in_40_percent_fewer_passes(
    engines: dict[bool, Engine],
) -> None:
    """One request at a time: between two sampled values everything is forced (`", "age": `),
    and the draft before each value (` "` or ` `) saves one more pass when the model agrees."""
    passes: dict[bool, int] = {}
    texts: dict[bool, list[str]] = {}
    for jump_forward, engine in engines.items():
        before = engine.get_stats()["num_forward_passes"]
        texts[jump_forward] = []
        for name, age, city in PEOPLE:
            prompt = (
                "Extract the person as JSON with keys name, age and city: "
                f"{name} is {age} years old and lives in {city}."
            )
            out = engine.generate(
                chat(engine, prompt),
                {"max_new_tokens": 64, "temperature": 0, "json_schema": PERSON_SCHEMA},
            )
            assert isinstance(out, dict)
            texts[jump_forward].append(out["text"])
        passes[jump_forward] = engine.get_stats()["num_forward_passes"] - before
    assert texts[True] == texts[False]
    for text in texts[True]:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert passes[True] <= 0.6 * passes[False], passes


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"regex": "[0-9]+("}, "invalid regex"),
        ({"json_schema": '{"type": "object", "properties": '}, "json_schema is not valid JSON"),
        ({"json_schema": {"type": "strnig"}}, "strnig"),
        ({"json_schema": "[]"}, "must be a JSON object"),
        ({"ebnf": 'root ::= "a" missing'}, "missing"),
        ({"regex": "a", "json_schema": "{}"}, "at most one of"),
    ],
)
def test_bad_grammars_are_rejected_and_the_engine_still_serves(
    engines: dict[bool, Engine], params: dict[str, Any], message: str
) -> None:
    engine = engines[True]
    with pytest.raises(ValueError, match=message):
        engine.generate("Hello", {"max_new_tokens": 4, **params})
    out = engine.generate("Hello", {"max_new_tokens": 4, "temperature": 0, "regex": "[a-z]+"})
    assert isinstance(out, dict) and re.fullmatch("[a-z]+", out["text"])


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump", "plain"])
def test_streamed_text_is_the_final_text(engines: dict[bool, Engine], jump_forward: bool) -> None:
    engine = engines[jump_forward]
    prompt, schema = SCHEMAS["person"]
    params: dict[str, Any] = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 0,
        "json_schema": schema,
    }
    stream = engine.generate(chat(engine, prompt), params, stream=True)
    assert isinstance(stream, Iterator)
    chunks = list(stream)
    final = engine.generate(chat(engine, prompt), params)
    assert isinstance(final, dict)
    assert chunks[-1]["text"] == final["text"] and chunks[-1]["output_ids"] == final["output_ids"]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    jsonschema.validate(json.loads(final["text"]), schema)


def test_logprobs_cover_every_output_token(engines: dict[bool, Engine]) -> None:
    """Jump-forward is skipped for requests that return logprobs: forced tokens have none."""
    engine = engines[True]
    prompt, schema = SCHEMAS["enum"]
    out = engine.generate(
        chat(engine, prompt),
        {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "json_schema": schema},
        return_logprob=True,
    )
    assert isinstance(out, dict)
    logprobs = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in logprobs] == out["output_ids"]
    jsonschema.validate(json.loads(out["text"]), schema)


def test_max_new_tokens_cuts_the_forced_start(engines: dict[bool, Engine]) -> None:
    for engine in engines.values():
        out = engine.generate("Hi", {"max_new_tokens": 2, "json_schema": SCHEMAS["person"][1]})
        assert isinstance(out, dict)
        assert out["text"] == '{"name'
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


# Tokens of each schema's shortest document (`Closer.complete` from the start).
SHORTEST = {"person": 15, "nested": 20, "array": 10, "enum": 13, "numbers": 17, "optional": 5}


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump", "plain"])
def test_json_cut_by_a_tight_budget_still_validates(
    engines: dict[bool, Engine], jump_forward: bool
) -> None:
    """Budget-aware closing, greedy: budgets 3 tokens above each schema's shortest document cut
    most outputs short, and each still validates, ending by length within its budget."""
    engine = engines[jump_forward]
    cases = [c for c in CASES if c.key == "json_schema"]
    budgets = [SHORTEST[c.name] + 3 for c in cases]
    params = [
        {**c.params(0.0, seed=0), "max_new_tokens": b} for c, b in zip(cases, budgets, strict=True)
    ]
    outs = engine.generate([chat(engine, c.prompt) for c in cases], params)
    assert isinstance(outs, list)
    closed = 0
    for case, budget, out in zip(cases, budgets, outs, strict=True):
        case.check(out["text"])
        reason, tokens = out["meta_info"]["finish_reason"], out["meta_info"]["completion_tokens"]
        if reason["type"] == "length":
            closed += 1
            assert reason["length"] == tokens <= budget
        else:
            assert reason == {"type": "stop", "matched": None}, reason
    assert closed >= len(cases) // 2


def test_a_grammar_nothing_matches_ends_with_no_output(engines: dict[bool, Engine]) -> None:
    # Compiles, but no output matches: the first token the model picks is rejected, and the
    # request ends with the grammar's error, not with that token.
    impossible = {"max_new_tokens": 4, "temperature": 0, "regex": "[^\\x00-\\U0010FFFF]"}
    for engine in engines.values():
        out = engine.generate("Hello", impossible)
        assert isinstance(out, dict)
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "grammar error" in reason["message"], reason
        assert (out["output_ids"], out["text"]) == ([], "")
