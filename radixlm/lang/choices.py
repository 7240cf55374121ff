"""How `select` picks a choice from the logprobs of each choice's tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# One scored token, as /generate returns it: [logprob, token_id, text or None].
LogprobTriple = list[Any]


@dataclass(frozen=True)
class ChoiceScores:
    """The logprobs of each choice's tokens given the prompt (and, if asked, given nothing)."""

    choices: list[str]
    token_logprobs: list[list[LogprobTriple]]  # per choice, the tokens that spell the choice
    unconditional_logprobs: list[list[LogprobTriple]] | None = None

    @property
    def normalized(self) -> list[float]:
        """Mean logprob per token of each choice (SGLang's normalized_prompt_logprobs)."""
        return [_mean([t[0] for t in toks]) for toks in self.token_logprobs]


@dataclass(frozen=True)
class ChoiceDecision:
    """The chosen string and the scores behind it (returned by `s.get_meta_info(name)`)."""

    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class ChoicesMethod:
    """A rule that picks one choice from ChoiceScores."""

    requires_unconditional_logprobs = False

    def __call__(self, scores: ChoiceScores) -> ChoiceDecision:
        """Pick a choice."""
        raise NotImplementedError

    def _meta(self, scores: ChoiceScores, **extra: Any) -> dict[str, Any]:
        return {
            "normalized_prompt_logprobs": scores.normalized,
            "input_token_logprobs": scores.token_logprobs,
            **extra,
        }


class TokenLengthNormalized(ChoicesMethod):
    """The choice with the highest mean logprob per token (SGLang's default)."""

    def __call__(self, scores: ChoiceScores) -> ChoiceDecision:
        """Pick a choice."""
        best = _argmax(scores.normalized)
        return ChoiceDecision(scores.choices[best], self._meta(scores))


class GreedyTokenSelection(ChoicesMethod):
    """Follow the most likely token position by position; a shorter choice that runs out is
    extended with its own mean logprob."""

    def __call__(self, scores: ChoiceScores) -> ChoiceDecision:
        """Pick a choice."""
        rows = [[float(t[0]) for t in toks] for toks in scores.token_logprobs]
        width = max(len(r) for r in rows)
        matrix = [r + [_mean(r)] * (width - len(r)) for r in rows]
        remaining = list(range(len(matrix)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta = self._meta(scores, greedy_logprob_matrix=matrix)
        return ChoiceDecision(scores.choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The choice whose tokens gain the most, on average, from the prompt: mean of
    logprob(token | prompt) - logprob(token | preceding choice tokens alone)."""

    requires_unconditional_logprobs = True

    def __call__(self, scores: ChoiceScores) -> ChoiceDecision:
        """Pick a choice."""
        if scores.unconditional_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        values = []
        for cond, uncond in zip(scores.token_logprobs, scores.unconditional_logprobs, strict=True):
            # The first token has no context of its own: its unconditional logprob is None -> 0.
            diffs = [c[0] - (u[0] or 0.0) for c, u in zip(cond, uncond, strict=True)]
            values.append(_mean(diffs))
        meta = self._meta(
            scores,
            unconditional_token_logprobs=scores.unconditional_logprobs,
            normalized_unconditional_prompt_logprobs=values,
        )
        return ChoiceDecision(scores.choices[_argmax(values)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def choice_tokens(
    entries: list[LogprobTriple], prefix: str, choice: str, prefix_tokens: int, start: int
) -> list[LogprobTriple]:
    """The entries (prompt logprobs from position `start` of prefix + choice) that spell `choice`.

    A token counts if any of its characters belong to the choice, so a token that merges the end
    of the prefix with the start of the choice (" yes" after a prefix ending in a space) is scored:
    it is how the model would write the choice. Token texts locate the boundary; where they do not
    spell the text exactly (bytes of a split character), the tokens after the prefix's own
    `prefix_tokens` are taken instead.
    """
    texts = [e[2] if isinstance(e[2], str) else None for e in entries]
    full = prefix + choice
    if all(t is not None for t in texts):
        tail = "".join(t for t in texts if t is not None)
        if full.endswith(tail):
            pos = len(full) - len(tail)
            kept = []
            for entry, text in zip(entries, texts, strict=True):
                assert text is not None
                pos += len(text)
                if pos > len(prefix) and entry[0] is not None:
                    kept.append(entry)
            if kept:
                return kept
    return [e for e in entries[max(prefix_tokens - start, 0) :] if e[0] is not None]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else -math.inf


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
