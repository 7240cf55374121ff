"""llguidance grammars from specs, and their validation; no torch, so the frontend can use it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import llguidance as llg

from radixlm.grammar.base import GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON schemas get fixed separators and no free whitespace: the model cannot spend tokens on
# layout, and everything between two values (`", "age": `) is forced, which jump-forward then
# appends in one step. A schema's own "x-guidance" options override these defaults.
JSON_DEFAULTS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def llguidance_grammar(spec: GrammarSpec) -> str:
    """llguidance's grammar for a spec; ValueError if the spec cannot even be read."""
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(spec.json_schema(), defaults=JSON_DEFAULTS)
    try:
        return llg.grammar_from("ebnf", spec.text)  # GBNF (`root ::= ...`) or Lark
    except ValueError as e:
        raise ValueError(f"invalid ebnf: {e}") from None


def validate_grammar(spec: GrammarSpec, tokenizer: llg.LLTokenizer | None = None) -> str:
    """Check a spec without building a matcher; returns llguidance's grammar, or ValueError.

    Without a tokenizer this catches every syntax error (regex, schema, grammar) in well under a
    millisecond, which is what the frontend needs to answer 400 before queueing a request.
    """
    grammar = llguidance_grammar(spec)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise ValueError(f"invalid {spec.kind}: {messages[0].strip()}")
    return grammar
