"""Structured output: regex / JSON schema / EBNF constraints, with jump-forward decoding."""

from radixlm.grammar.base import GrammarBackend, GrammarKind, GrammarMatcher, GrammarSpec
from radixlm.grammar.manager import GrammarCache, GrammarManager, validate_spec

__all__ = [
    "GrammarBackend",
    "GrammarCache",
    "GrammarKind",
    "GrammarManager",
    "GrammarMatcher",
    "GrammarSpec",
    "validate_spec",
]
