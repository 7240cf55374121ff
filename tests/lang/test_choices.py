"""select's scoring rules on hand-made logprobs."""

from __future__ import annotations

import math

import pytest

from radixlm.lang.choices import (
    ChoiceScores,
    choice_tokens,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)


def scores(
    *rows: list[float], unconditional: list[list[float | None]] | None = None
) -> ChoiceScores:
    choices = [f"c{i}" for i in range(len(rows))]
    toks = [[[lp, j, "t"] for j, lp in enumerate(r)] for r in rows]
    uncond = None
    if unconditional is not None:
        uncond = [[[lp, j, "t"] for j, lp in enumerate(r)] for r in unconditional]
    return ChoiceScores(choices, toks, uncond)


def test_token_length_normalized_picks_the_best_mean() -> None:
    s = scores([-1.0, -1.0], [-0.5, -2.0, -2.0], [-1.2])
    assert s.normalized == pytest.approx([-1.0, -1.5, -1.2])
    decision = token_length_normalized(s)
    assert decision.decision == "c0"
    assert decision.meta_info["normalized_prompt_logprobs"] == s.normalized


def test_greedy_token_selection_follows_the_best_token() -> None:
    # c1 has the best first token even though its mean is worse.
    s = scores([-1.0, -0.1], [-0.5, -5.0])
    assert greedy_token_selection(s).decision == "c1"
    # A tie on the first token is broken by the next one; the short choice is padded by its mean.
    s = scores([-0.5], [-0.5, -0.2])
    d = greedy_token_selection(s)
    assert d.decision == "c1"
    assert d.meta_info["greedy_logprob_matrix"] == [[-0.5, -0.5], [-0.5, -0.2]]


def test_unconditional_likelihood_normalized() -> None:
    # c0 is likely anyway (unconditionally), c1 is made likely by the prompt.
    s = scores([-1.0, -1.0], [-2.0, -2.0], unconditional=[[None, -0.5], [None, -4.0]])
    d = unconditional_likelihood_normalized(s)
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([-0.75, 0.0])
    assert d.decision == "c1"
    with pytest.raises(ValueError):
        unconditional_likelihood_normalized(scores([-1.0]))


def test_choice_tokens_finds_the_choice_by_token_text() -> None:
    # "Answer:" + "True": the prompt logprobs from position 1 are ":" and "True".
    entries = [[-3.0, 42, ":"], [-1.5, 2787, "True"]]
    assert choice_tokens(entries, "Answer:", "True", prefix_tokens=2, start=0 + 1) == [entries[1]]
    # "Answer: " + "yes" re-tokenizes as "Answer", ":", " yes": the merged token is the choice's.
    entries = [[-3.0, 42, ":"], [-0.7, 9805, " yes"]]
    assert choice_tokens(entries, "Answer: ", "yes", prefix_tokens=3, start=1) == [entries[1]]
    # Texts that do not spell the prompt (a split multi-byte character): count by position.
    entries = [[-3.0, 42, ":"], [-1.0, 7, "\ufffd"], [-2.0, 8, "\ufffd"]]
    assert choice_tokens(entries, "Answer:", "é", prefix_tokens=2, start=1) == entries[1:]


def test_empty_scores_are_minus_infinity() -> None:
    assert scores([]).normalized == [-math.inf]
