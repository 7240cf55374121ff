"""Speculative decoding without a draft model: propose drafts for a step's decodes, and take
the verified part of each after the step.

A draft is appended to the request's output (`Req.spec_draft` tokens) and fed with the token
before it in one extend, so the forward returns logits at every draft position; the plan samples
each of them (the sampler sees the output up to that position, and its grammar there). Draft
token i is accepted while the model's own sample at its position is that token, and the first
sample that differs is the step's token. With greedy decoding that is exactly the sequence
decoding without drafts writes. With sampling it is exact speculative sampling for a
deterministic draft: token x is accepted with probability p(x) (after every sampling transform),
and on rejection the token is drawn from p conditioned on not being x, which is the residual
max(p - q, 0) renormalised for a draft that puts all its mass q on x; so the output distribution
is unchanged (a request's `sampling_seed` even gives the same tokens: its draws depend on the
step only).

Drafts cost slots only during the step that verifies them, and only free ones (the cache is not
evicted for a guess); the scheduler frees the rejected ones at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from radixlm.cache import RadixCache
from radixlm.cache.radix import common_prefix_len
from radixlm.core.draft import DraftState
from radixlm.core.messages import SpecCounters
from radixlm.core.request import Req
from radixlm.speculative.config import SpecConfig
from radixlm.speculative.cost import StepCost, StepCostFit, allot
from radixlm.speculative.lookup import lookup_draft
from radixlm.speculative.tree import SuffixIndex, cached_continuation

# Each step, a request's record of accepted drafts fades by this factor (whether it drafts or
# not; half-life about 23 steps): recent drafts predict the next best, and a request whose
# drafts missed drafts again once its record has faded back toward its source's.
FADE = 0.97
# The weight, in seen draft tokens, of the draft source's acceptance in a request's estimate.
PRIOR_WEIGHT = 1.0
# Each verification, a source's record fades by this factor: it follows the current work (a
# source right on quoted text is not right on free text).
SOURCE_FADE = 0.95


@dataclass(slots=True)
class Acceptance:
    """A draft source's record of its drafts, across requests: tokens accepted and seen."""

    hits: float = 1.0  # a fresh source counts as right half the time
    trials: float = 2.0

    @property
    def rate(self) -> float:
        """The chance that a draft token is accepted, given the tokens before it were."""
        return self.hits / self.trials


class Speculator:
    """Proposes drafts for decodes and takes in their verification; counts by draft source.
    `cost` (the machine's decode step cost by rows) decides how many draft tokens a step
    feeds, and whose."""

    def __init__(self, config: SpecConfig, cache: RadixCache, cost: StepCost) -> None:
        self.config = config
        self.cost = cost  # what propose allots by
        # Refits cost from the decode steps run (None: cost stays as set).
        self.cost_fit: StepCostFit | None = StepCostFit(cost)
        self.counters: dict[str, SpecCounters] = {}
        self.acceptance: dict[str, Acceptance] = {}
        self.suffix: SuffixIndex | None = None  # radix drafts from suffix matches
        if config.algorithm in ("radix", "both"):
            self.suffix = SuffixIndex(cache)
            self.counters["radix"] = SpecCounters()
            self.acceptance["radix"] = Acceptance()
        if config.algorithm in ("ngram", "both"):
            self.counters["ngram"] = SpecCounters()
            self.acceptance["ngram"] = Acceptance()

    def propose(self, decodes: list[Req], free_slots: int, context_len: int) -> None:
        """Append a draft to the decodes whose draft tokens are worth their rows (`allot`): each
        decode needs one slot of free_slots for itself, each draft token one more."""
        rows = sum(1 + r.num_draft for r in decodes)
        most = min(self.cost.max_rows, free_slots)
        if rows >= most:
            return
        found: list[tuple[Req, str, list[int], float]] = []
        for req in decodes:
            state = req.draft
            if state is None:
                state = req.draft = DraftState()
            state.hits *= FADE
            state.trials *= FADE
            room = min(
                self.config.num_draft_tokens,
                req.remaining_new_tokens - 1,  # the step's own token must fit too
                context_len - req.seq_len - 1,
            )
            if req.num_draft or room <= 0:
                continue
            source, draft = self._draft(req, state, room)
            if draft:
                prior = self.acceptance[source].rate
                alpha = (state.hits + PRIOR_WEIGHT * prior) / (state.trials + PRIOR_WEIGHT)
                found.append((req, source, draft, alpha))
        if not found:
            return
        lengths = allot(
            [a for *_, a in found],
            [len(d) for _, _, d, _ in found],
            len(decodes),
            rows,
            most,
            self.cost,
        )
        for (req, source, draft, _), n in zip(found, lengths, strict=True):
            draft = draft[:n]
            if draft and req.grammar is not None:
                draft = draft[: req.grammar.accept_draft(draft)]
            if not draft:
                continue
            req.output_ids += draft
            req.spec_draft = len(draft)
            assert req.draft is not None
            req.draft.source = source

    def _draft(self, req: Req, state: DraftState, k: int) -> tuple[str, list[int]]:
        """The first draft source with something to propose: the tree's continuation of the
        sequence, prompt lookup, then suffix matches over the tree."""
        ids = req.fill_ids
        algorithm = self.config.algorithm
        if algorithm != "ngram" and req.node is not None:
            draft = cached_continuation(req.node, ids, req.tree_len, k, req.salt, req.public_len)
            if draft:
                return "radix", draft
        if algorithm != "radix":
            draft = lookup_draft(state, ids, k)
            if draft:
                return "ngram", draft
        if self.suffix is not None:
            draft = self.suffix.draft(ids, k, req.salt)
            if draft:
                return "radix", draft
        return "", []

    def observe_step(self, rows: int, seconds: float) -> None:
        """Take in the wall time of a decode step (no prefill) of `rows` rows."""
        if self.cost_fit is not None:
            self.cost = self.cost_fit.observe(rows, seconds)

    def verify(self, req: Req, sampled: list[int]) -> int:
        """Keep the accepted part of req's draft (sampled: the model's token at each draft
        position, then after the draft); returns how many draft tokens were accepted. The
        rejected ones leave req.output_ids (and its grammar); the caller frees their slots."""
        k = req.spec_draft
        base = len(req.output_ids) - k
        accepted = common_prefix_len(req.output_ids[base:], sampled, 0)
        req.spec_draft = 0
        if req.grammar is not None:
            req.grammar.reject_draft(k - accepted)
        del req.output_ids[base + accepted :]
        state = req.draft
        assert state is not None
        counters = self.counters[state.source]
        counters.drafted += k
        counters.accepted += accepted
        counters.verified += 1
        seen = accepted + (accepted < k)  # the accepted tokens and the first rejected one
        state.hits += accepted
        state.trials += seen
        source = self.acceptance[state.source]
        source.hits = source.hits * SOURCE_FADE + accepted
        source.trials = source.trials * SOURCE_FADE + seen
        return accepted

    def stats(self) -> dict[str, SpecCounters]:
        """A copy of the counters, by draft source."""
        return {name: replace(c) for name, c in self.counters.items()}

    def discard(self, req: Req) -> None:
        """Take req's draft back unverified (its step failed)."""
        if req.spec_draft:
            if req.grammar is not None:
                req.grammar.reject_draft(req.spec_draft)
            del req.output_ids[len(req.output_ids) - req.spec_draft :]
            req.spec_draft = 0
