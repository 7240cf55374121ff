"""Structured output: regex / JSON schema / EBNF constraints, with jump-forward decoding.

The package itself holds only what the frontend needs (specs and their validation, no torch);
the engine imports radixlm.grammar.manager and radixlm.grammar.state.
"""

from radixlm.grammar.base import GrammarBackend, GrammarKind, GrammarMatcher, GrammarSpec

__all__ = ["GrammarBackend", "GrammarKind", "GrammarMatcher", "GrammarSpec", "validate_spec"]


def validate_spec(spec: GrammarSpec) -> None:
    """ValueError naming the problem if spec is not a valid regex / JSON schema / EBNF grammar."""
    from radixlm.grammar.llguidance_grammar import validate_grammar

    validate_grammar(spec)
