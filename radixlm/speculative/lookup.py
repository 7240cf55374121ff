"""Prompt lookup: the longest recent n-gram of a sequence found earlier in the sequence itself
(prompt or output) proposes the tokens that followed it (vLLM's `ngram`, llama.cpp's lookup)."""

from __future__ import annotations

from radixlm.core.draft import DraftState

# N-gram sizes looked up, longest first: a longer match predicts better; 1 would match nearly
# always and be right rarely.
LOOKUP_NGRAMS = (4, 3, 2)


def lookup_draft(state: DraftState, ids: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram of
    ids; indexes the positions of ids not indexed yet first (ids grows between calls; cut back, it is
    indexed again)."""
    if state.indexed > len(ids):
        state.ngrams.clear()
        state.indexed = 0
    # Index every n-gram ending before the last position: the suffix itself never matches.
    for end in range(max(state.indexed, 1), len(ids)):
        for n in LOOKUP_NGRAMS:
            if end >= n:
                state.ngrams[tuple(ids[end - n : end])] = end
    state.indexed = len(ids)
    for n in LOOKUP_NGRAMS:
        if len(ids) < n:
            continue
        found = state.ngrams.get(tuple(ids[-n:]))
        if found is not None:
            return ids[found : found + k]
    return []
