"""Prompt lookup against a naive search of the sequence."""

from __future__ import annotations

import random

import pytest

from radixlm.core.draft import DraftState
from radixlm.speculative.lookup import LOOKUP_NGRAMS, lookup_draft


def naive(ids: list[int], k: int) -> list[int]:
    """The continuation of the latest earlier occurrence of the longest suffix n-gram."""
    for n in LOOKUP_NGRAMS:
        if len(ids) < n:
            continue
        gram = ids[-n:]
        for end in range(len(ids) - 1, n - 1, -1):  # latest first, never the suffix itself
            if ids[end - n : end] == gram:
                return ids[end : end + k]
    return []


@pytest.mark.parametrize("seed", range(4))
def test_incremental_lookup_equals_the_naive_search(seed: int) -> None:
    rng = random.Random(seed)
    state = DraftState()
    ids: list[int] = []
    for step in range(300):
        if step % 50 == 49 and ids:  # the sequence cut back (a rejected draft, a retokenization)
            del ids[rng.randint(0, len(ids) - 1) :]
        ids += [rng.randint(0, 5) for _ in range(rng.randint(1, 3))]
        k = rng.randint(1, 6)
        assert lookup_draft(state, ids, k) == naive(ids, k), (step, ids[-8:])


def test_no_draft_without_an_earlier_occurrence() -> None:
    state = DraftState()
    assert lookup_draft(state, [1, 2, 3, 4], 4) == []
    assert lookup_draft(state, [1, 2, 3, 4, 1, 2], 4) == [3, 4, 1, 2]
