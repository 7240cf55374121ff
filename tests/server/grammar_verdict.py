"""What a grammar (llguidance's Lark syntax) makes of a text, over SmolLM2's tokenizer."""

from __future__ import annotations

from radixlm.grammar.base import GrammarSpec
from radixlm.grammar.llguidance_backend import LLGuidanceBackend
from radixlm.tokenizer import Tokenizer


def run(backend: tuple[LLGuidanceBackend, Tokenizer], grammar: str, text: str) -> str:
    """'ok' (accepted, may end here), 'open' (accepted, must go on) or 'rejected'."""
    ll, tok = backend
    m = ll.matcher(ll.compile(GrammarSpec("ebnf", grammar)))
    if not m.accept(tok.encode(text, add_special_tokens=False)):
        return "rejected"
    return "ok" if m.is_accepting else "open"
