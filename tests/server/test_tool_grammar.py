"""The grammar of tool calls, run by llguidance over SmolLM2's tokenizer: what it lets through."""

from __future__ import annotations

import pytest
from grammar_verdict import run

from radixlm.grammar.llguidance_backend import LLGuidanceBackend
from radixlm.server.reasoning import REASONING_FORMATS
from radixlm.server.tool_grammar import Function, tool_grammar
from radixlm.server.tool_parser import HERMES, LLAMA3, MISTRAL
from radixlm.tokenizer import Tokenizer

ADD = Function(
    "add",
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
)
FUNCTIONS = [ADD, Function("ping", {"type": "object"})]
CALL = '{"name": "add", "arguments": {"a": 1}}'
BLOCK = f"<tool_call>\n{CALL}\n</tool_call>"


@pytest.mark.parametrize(
    ("fmt", "required", "parallel", "text", "verdict"),
    [
        (HERMES, True, True, BLOCK, "ok"),
        (HERMES, True, True, f"{BLOCK}\n{BLOCK}", "ok"),
        (HERMES, True, True, "Hi", "rejected"),
        (HERMES, True, False, f"{BLOCK}\n", "rejected"),
        (HERMES, True, True, '<tool_call>\n{"name": "add", "arguments": {"a": "x"', "rejected"),
        # auto: text runs free; once the call opens, it must follow the schema
        (HERMES, False, True, f"Hi {BLOCK} bye", "ok"),
        (HERMES, False, True, "Hi <tool", "ok"),
        (HERMES, False, True, "Hi <tool_call>\n", "open"),
        (HERMES, False, True, 'Hi <tool_call>\n{"name": "sub"', "rejected"),
        (HERMES, False, False, f"Hi {BLOCK} bye", "rejected"),
        (MISTRAL, True, True, f"[TOOL_CALLS][{CALL}, {CALL}]", "ok"),
        (MISTRAL, False, False, f"Hi [TOOL_CALLS][{CALL}, ", "rejected"),
        (LLAMA3, True, True, CALL.replace("arguments", "parameters"), "ok"),
        (LLAMA3, False, True, "Plain {text}", "ok"),
        (LLAMA3, False, True, '{"name": "pong"', "rejected"),
    ],
)
def test_tool_grammar(
    grammar_backend: tuple[LLGuidanceBackend, Tokenizer],
    fmt: object,
    required: bool,
    parallel: bool,
    text: str,
    verdict: str,
) -> None:
    grammar = tool_grammar(fmt, FUNCTIONS, required, parallel)  # type: ignore[arg-type]
    assert run(grammar_backend, grammar, text) == verdict


def test_a_named_function_only(grammar_backend: tuple[LLGuidanceBackend, Tokenizer]) -> None:
    grammar = tool_grammar(HERMES, [FUNCTIONS[1]], required=True, parallel=True)
    assert run(grammar_backend, grammar, BLOCK) == "rejected"


def test_calls_come_after_the_reasoning(
    grammar_backend: tuple[LLGuidanceBackend, Tokenizer],
) -> None:
    r1 = REASONING_FORMATS["deepseek-r1"]
    grammar = tool_grammar(HERMES, FUNCTIONS, True, True, reasoning=r1, in_reasoning=True)
    assert run(grammar_backend, grammar, f"Free <b>text</b>\n</think>\n{BLOCK}") == "ok"
    assert run(grammar_backend, grammar, "Free text</think>Hi") == "rejected"
    qwen3 = REASONING_FORMATS["qwen3"]
    grammar = tool_grammar(HERMES, FUNCTIONS, True, True, reasoning=qwen3)
    assert run(grammar_backend, grammar, f"<think>hm</think>{BLOCK}") == "ok"
    assert run(grammar_backend, grammar, BLOCK) == "ok"


def test_a_special_token_trigger(grammar_backend: tuple[LLGuidanceBackend, Tokenizer]) -> None:
    _, tok = grammar_backend
    (im_start,) = tok.encode("<|im_start|>", add_special_tokens=False)
    grammar = tool_grammar(MISTRAL, FUNCTIONS, False, True, trigger_token=im_start)
    assert run(grammar_backend, grammar, f"Hi <|im_start|>[{CALL}]") == "ok"
    assert run(grammar_backend, grammar, "Hi <|im_start|>[{") == "open"
    assert run(grammar_backend, grammar, "Hi <|im_start|>nope") == "rejected"
