"""Public prefixes: token runs that every tenant may share despite its salt."""

from __future__ import annotations

from collections.abc import Sequence


class PublicPrefixes:
    """The registered public prefixes (token ids). A salted request whose ids start with one
    matches and inserts that part in the shared namespace and the rest under its salt."""

    def __init__(self) -> None:
        self._prefixes: list[list[int]] = []

    def add(self, ids: Sequence[int]) -> bool:
        """Register ids; False if they already were."""
        ids = list(ids)
        if not ids:
            raise ValueError("a public prefix needs at least one token")
        if ids in self._prefixes:
            return False
        self._prefixes.append(ids)
        return True

    def items(self) -> list[list[int]]:
        """The registered prefixes, in registration order (the caller must not change them)."""
        return self._prefixes

    def boundary(self, ids: Sequence[int]) -> int:
        """Length of the longest registered prefix that ids start with; 0 if none."""
        best = 0
        for p in self._prefixes:
            n = len(p)
            if best < n <= len(ids) and list(ids[:n]) == p:
                best = n
        return best
