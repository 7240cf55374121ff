"""Grammars the chaos scenarios send: schemas whose forced text jump-forward skips, and grammars
that must fail, each with a part of the error it must fail with."""

from __future__ import annotations

import json
from typing import Any

# tests/ is on sys.path (its conftest's folder): the structured-output tests' catalogue of
# schemas is importable as a namespace package.
from grammar.grammar_cases import SCHEMAS

# Keys and separators are forced: each sampled value is followed by a forced tail.
SMALL_SCHEMA: dict[str, Any] = SCHEMAS["numbers"][1]  # three values, ~20 tokens
NESTED_SCHEMA: dict[str, Any] = SCHEMAS["nested"][1]  # forced tails across nesting levels

# Passes the frontend's check, which has no tokenizer, and fails the engine's compile.
BAD_TOKEN_RANGE = "start: <[99999999]>"
# Compiles, but no output matches it, not even an empty one: nothing but end-of-sequence is
# allowed at first, and the grammar rejects that too.
IMPOSSIBLE = "[^\\x00-\\U0010FFFF]"
# (grammar, a part of the error it must end with): the frontend rejects the first four (400).
BAD_GRAMMARS: list[tuple[dict[str, Any], str]] = [
    ({"regex": "a(+"}, "invalid regex"),
    ({"json_schema": "{"}, "json_schema"),
    ({"json_schema": json.dumps({"type": "integer", "minimum": 5, "maximum": 3})}, "Unsatisfiable"),
    ({"ebnf": "root ::= b"}, "invalid ebnf"),
    ({"ebnf": BAD_TOKEN_RANGE}, "Token range end too large"),
    ({"regex": IMPOSSIBLE}, "grammar error"),
]
# An ambiguous grammar: the parser's work for each token grows with the output (~5 ms a step
# after 200 characters, ~100 ms after 600), and every step of a batch waits for its mask.
SLOW_EBNF = 'start: x+\nx: "a" | "a" "a" | x x'
