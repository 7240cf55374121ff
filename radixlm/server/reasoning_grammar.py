"""Grammars (llguidance's Lark syntax) of a reasoning model's output: the reasoning runs free up
to its end tag, the answer after it is constrained (tool calls, or a structured answer matching
the request's regex, JSON schema or EBNF grammar)."""

from __future__ import annotations

import json

import llguidance as llg

from radixlm.grammar import GrammarSpec, validate_spec
from radixlm.grammar.llguidance_grammar import JSON_DEFAULTS
from radixlm.server.reasoning import ReasoningFormat

_THOUGHT = r"THOUGHT: /(.|\n)*/"
_GAP = r"GAP: /[ \t\n]+/"  # the answer may start after some layout (`</think>\n\n`)


def reasoning_start(fmt: ReasoningFormat, in_reasoning: bool, body: str) -> list[str]:
    """The Lark start rule (and the rules it uses) of an output that may reason before `body`:
    it does when `in_reasoning` (the prompt opened the reasoning), else it may open it. The
    reasoning is a lazy lexeme, so it ends at the first end tag."""
    thought = "thought GAP?" if in_reasoning else f"({json.dumps(fmt.start)} thought GAP?)?"
    return [
        f"start: {thought} ({body})",
        f"thought[lazy]: THOUGHT {json.dumps(fmt.end)}",
        _THOUGHT,
        _GAP,
    ]


def answer_grammar(fmt: ReasoningFormat, in_reasoning: bool, spec: GrammarSpec) -> str:
    """The Lark grammar of an output that may reason first and then answers as `spec` says;
    ValueError naming the problem if spec is not valid."""
    validate_spec(spec)
    if spec.kind == "regex":
        answer = f"/{llg.regex_to_lark(spec.text)}/"
    elif spec.kind == "json_schema":
        schema = spec.json_schema()
        own = schema.get("x-guidance")
        options = {**JSON_DEFAULTS, **(own if isinstance(own, dict) else {})}  # its own win
        answer = f"%json {json.dumps({**schema, 'x-guidance': options}, ensure_ascii=False)}"
    else:  # GBNF or Lark, nested whole: its rule names cannot clash with ours
        answer = "%lark {\n" + llg.grammar_from("ebnf", spec.text) + "\n}"
    rules = [*reasoning_start(fmt, in_reasoning, "answer"), f"answer: {answer}"]
    return "\n".join(["%llguidance {}", *rules]) + "\n"
