"""A request's speculative-decoding state: its prompt-lookup index and its adaptive draft length."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class DraftState:
    """What the speculator keeps per request (radixlm/speculative/speculator.py)."""

    length: int  # tokens the next draft may have: +1 after a draft accepted whole, else 1 past
    # the accepted part
    # Prompt lookup: for each n-gram size, the n-gram -> the position just after its latest
    # occurrence among the first `indexed` positions of the sequence (so never its own suffix).
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    source: str = ""  # the algorithm that proposed the pending draft (metrics)
    misses: int = 0  # drafts in a row with nothing accepted
    cooldown: int = 0  # steps to decode without drafting (after misses)
