"""Speculative decoding's arguments (no torch: the server process validates them too)."""

from __future__ import annotations

from dataclasses import dataclass

ALGORITHMS = ("ngram", "radix", "both")
# A draft and the token before it are one short row of the runner (radixlm.core.plan.MAX_ROW_QUERIES).
MAX_DRAFT_TOKENS = 15


@dataclass(frozen=True)
class SpecConfig:
    """Which draft sources, and the longest draft (each request's length adapts below it)."""

    algorithm: str  # ngram | radix | both
    num_draft_tokens: int = 8

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"speculative_algorithm must be one of {', '.join(ALGORITHMS)}, "
                f"got {self.algorithm!r}"
            )
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"speculative_num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], "
                f"got {self.num_draft_tokens}"
            )
