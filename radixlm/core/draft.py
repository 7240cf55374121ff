"""A request's speculative-decoding state: its prompt-lookup index and its recent acceptance."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class DraftState:
    """What the speculator keeps per request (radixlm/speculative/speculator.py)."""

    # Prompt lookup: for each n-gram size, the n-gram -> the position just after its latest
    # occurrence among the first `indexed` positions of the sequence (so never its own suffix).
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    source: str = ""  # the algorithm that proposed the pending draft (metrics)
    # Recent verifications, fading with every step: draft tokens accepted, and the tokens whose
    # fate was seen (the accepted ones and the first rejected one).
    hits: float = 0.0
    trials: float = 0.0
