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

from dataclasses import replace

from radixlm.cache import RadixCache
from radixlm.cache.radix import common_prefix_len
from radixlm.core.draft import DraftState
from radixlm.core.messages import SpecCounters
from radixlm.core.request import Req
from radixlm.speculative.config import SpecConfig
from radixlm.speculative.lookup import lookup_draft
from radixlm.speculative.tree import SuffixIndex, cached_continuation

# Rows a step's decodes may verify in all (decodes plus drafts): on the CPU, the GEMMs of up to
# this many rows stream each weight once (radixlm.kernels.decode.STREAM_ROWS); past it they go
# to BLAS and a step costs far more. Each decode gets an equal share of the spare rows, so a
# batch of more than half this many decodes gets no drafts at all.
MAX_VERIFY_ROWS = 16
# A draft with nothing accepted makes its request decode 2 steps without drafting; each more in
# a row doubles that, up to this many. (A draft costs rows of the step, which at batch > 1 on a
# CPU is time for every request in it.)
MAX_COOLDOWN = 16


class Speculator:
    """Proposes drafts for decodes and takes in their verification; counts by draft source."""

    def __init__(self, config: SpecConfig, cache: RadixCache) -> None:
        self.config = config
        self.counters: dict[str, SpecCounters] = {}
        self.suffix: SuffixIndex | None = None  # radix drafts from suffix matches
        if config.algorithm in ("radix", "both"):
            self.suffix = SuffixIndex(cache)
            self.counters["radix"] = SpecCounters()
        if config.algorithm in ("ngram", "both"):
            self.counters["ngram"] = SpecCounters()

    def propose(self, decodes: list[Req], free_slots: int, context_len: int) -> None:
        """Append a draft to the decodes that have one (each decode needs one slot of
        free_slots for itself); none when the batch is too large for drafts to pay."""
        share = min(MAX_VERIFY_ROWS - len(decodes), free_slots - len(decodes)) // len(decodes)
        if share <= 0:
            return
        for req in decodes:
            if req.num_draft:
                continue
            state = req.draft
            if state is None:
                state = req.draft = DraftState(length=1)  # grows while drafts are accepted
            if state.cooldown:
                state.cooldown -= 1
                continue
            room = min(
                state.length,
                share,
                req.remaining_new_tokens - 1,  # the step's own token must fit too
                context_len - req.seq_len - 1,
            )
            if room <= 0:
                continue
            source, draft = self._draft(req, state, room)
            if draft and req.grammar is not None:
                draft = draft[: req.grammar.accept_draft(draft)]
            if not draft:
                continue
            req.output_ids += draft
            req.spec_draft, state.source = len(draft), source

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
        limit = self.config.num_draft_tokens
        state.length = min(limit, state.length + 1) if accepted == k else max(1, accepted + 1)
        state.misses = 0 if accepted else state.misses + 1
        state.cooldown = min(2**state.misses, MAX_COOLDOWN) if state.misses else 0
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
