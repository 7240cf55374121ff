"""Budget-aware closing: a short way from a JSON grammar's state to a complete document.

When a JSON output is about to run out of tokens (`max_new_tokens` or the context), the engine
ends it with such a completion instead of cutting it, so that it always parses
(`GrammarState._close` decides when). The completion is found greedily, in microseconds: what the
grammar forces is taken as it comes (the rest of `"age": `, a required key, the `ue` of `true`),
and where the grammar leaves a choice the first allowed move closes the most: the string, then
the object or array, then the smallest value. Every move is checked against the matcher and
undone afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixlm.grammar.base import GrammarBackend, GrammarMatcher

# Moves tried in order outside strings: close what is open, then the smallest value of each type
# (`"` opens a string, which the next move closes), then what opens or separates.
_STRUCTURAL = ("}", "]", ",", "0", '"', "true", "null", "{", "[")
# Allowed in any unconstrained string and nowhere else in JSON: the sign of being in a string,
# where `"` closes (elsewhere it would open a key or a value).
_IN_STRING = "x"
# Completions longer than this (moves of one or more tokens) are not looked for.
MAX_COMPLETION_TOKENS = 256
_MAX_HELD_BACK = 1024


class Closer:
    """Finds short completions of JSON grammars over one backend's tokenizer."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._held_back: dict[bytes, list[int]] = {}  # ` "`, ` `: a grammar holds back few texts
        self._structural = [self._tokens(t.encode()) for t in _STRUCTURAL]
        self._quote, self._in_string = self._tokens(b'"'), self._tokens(_IN_STRING.encode())

    def _tokens(self, text: bytes) -> list[int]:
        return self.backend.retokenize([], [], text) or []

    def complete(self, matcher: GrammarMatcher, context: Sequence[int]) -> list[int] | None:
        """Tokens that take matcher from its state to where the output may end (`canonical`);
        None when none were found. The matcher is left where it was."""
        path = self._walk(matcher)
        return None if path is None else self.canonical(matcher, context, path)

    def canonical(
        self, matcher: GrammarMatcher, context: Sequence[int], tokens: list[int]
    ) -> list[int]:
        """tokens (accepted by the grammar from matcher's state) as the tokenizer writes their
        text after `context` (the tokens before the matcher's position), or standing alone if
        it would merge with the context (`"` then `]}`); as given if that is not shorter."""
        own = self.backend.retokenize(context, tokens) if tokens else tokens
        if own is None:
            own = self.backend.retokenize((), tokens)
        if own is None or len(own) >= len(tokens) or matcher.num_valid(own) < len(own):
            return tokens
        return own

    def _walk(self, matcher: GrammarMatcher) -> list[int] | None:
        """The moves to where the output may end, each accepted as it is found and all undone
        before returning."""
        path: list[int] = []
        try:
            while not matcher.is_accepting:
                move = self._move(matcher)
                if not move or len(path) + len(move) > MAX_COMPLETION_TOKENS:
                    return None
                matcher.accept(move)
                path += move
            return path
        finally:
            matcher.rollback(len(path))

    def _move(self, matcher: GrammarMatcher) -> list[int]:
        """The walk's next tokens: the forced ones, else the first allowed candidate."""
        forced = matcher.forced_tokens()
        if forced:
            return forced
        held_back = matcher.forced_bytes()  # forced text that could merge with what follows
        candidates = [self._first_token(held_back)] if held_back else []
        if matcher.num_valid(self._in_string) == len(self._in_string):
            candidates += [self._quote, self._in_string]
        else:
            candidates += self._structural
        for move in candidates:
            if move and matcher.num_valid(move) == len(move):
                return move
        return self._any_token(matcher)

    def _first_token(self, text: bytes) -> list[int]:
        first = self._held_back.get(text)
        if first is None:
            if len(self._held_back) >= _MAX_HELD_BACK:
                self._held_back.clear()
            first = self._held_back[text] = self._tokens(text)[:1]
        return first

    def _any_token(self, matcher: GrammarMatcher) -> list[int]:
        """The smallest allowed token id (single bytes come first in BPE vocabularies), where no
        candidate fits (a pattern, an enum, a minimum)."""
        allowed = self.backend.fill_masks([matcher])[0].nonzero()
        return allowed[0].tolist() if len(allowed) else []  # (never accepting: no end token)
