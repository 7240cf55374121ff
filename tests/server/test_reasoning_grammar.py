"""The grammar of a reasoning model's structured answer, run by llguidance over SmolLM2's
tokenizer: the reasoning runs free, the answer after it must match the spec."""

from __future__ import annotations

import json

import pytest
from grammar_verdict import run

from radixlm.grammar.base import GrammarSpec
from radixlm.grammar.llguidance_backend import LLGuidanceBackend
from radixlm.server.reasoning import REASONING_FORMATS
from radixlm.server.reasoning_grammar import answer_grammar
from radixlm.tokenizer import Tokenizer

R1, QWEN3 = REASONING_FORMATS["deepseek-r1"], REASONING_FORMATS["qwen3"]
SCHEMA = GrammarSpec(
    "json_schema",
    json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
)
REGEX = GrammarSpec("regex", r"[0-9]{3}/x")
GBNF = GrammarSpec("ebnf", 'root ::= "yes" | "no"')
LARK = GrammarSpec("ebnf", 'start: item+\nitem: "{" /[a-z]/ "}"')  # braces in a nested grammar


@pytest.mark.parametrize(
    ("spec", "answer", "wrong"),
    [
        (SCHEMA, '{"a": 12}', '{"a": "x"}'),
        (REGEX, "123/x", "12x"),
        (GBNF, "yes", "maybe"),
        (LARK, "{a}{b}", "{ab}"),
    ],
)
def test_the_answer_comes_after_the_reasoning(
    grammar_backend: tuple[LLGuidanceBackend, Tokenizer], spec: GrammarSpec, answer: str, wrong: str
) -> None:
    grammar = answer_grammar(R1, True, spec)
    thought = 'Free {"text"} <b>, yes\n'
    assert run(grammar_backend, grammar, f"{thought}</think>\n\n{answer}") == "ok"
    assert run(grammar_backend, grammar, f"{thought}</think>{answer}") == "ok"
    assert run(grammar_backend, grammar, f"{thought}</think>\n{wrong}") == "rejected"
    # Before the end tag everything is reasoning, the answer too.
    assert run(grammar_backend, grammar, answer) == "open"


def test_a_model_that_opens_its_reasoning_may_skip_it(
    grammar_backend: tuple[LLGuidanceBackend, Tokenizer],
) -> None:
    grammar = answer_grammar(QWEN3, False, SCHEMA)
    assert run(grammar_backend, grammar, '<think>hm</think>\n{"a": 1}') == "ok"
    assert run(grammar_backend, grammar, '{"a": 1}') == "ok"
    assert run(grammar_backend, grammar, "hm") == "rejected"


def test_the_schemas_own_layout_wins(grammar_backend: tuple[LLGuidanceBackend, Tokenizer]) -> None:
    tight = {"type": "object", "x-guidance": {"item_separator": ",", "key_separator": ":"}}
    grammar = answer_grammar(R1, True, GrammarSpec("json_schema", json.dumps(tight)))
    assert run(grammar_backend, grammar, 'hm</think>{"a":1,"b":2}') == "ok"
    assert run(grammar_backend, grammar, 'hm</think>{"a": 1}') == "rejected"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("regex", "(unclosed"), "invalid regex"),
        (GrammarSpec("json_schema", "{nope"), "not valid JSON"),
        (GrammarSpec("ebnf", "root ::= ("), "ebnf"),
    ],
)
def test_a_bad_spec_names_itself(spec: GrammarSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        answer_grammar(R1, True, spec)
