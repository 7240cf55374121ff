"""Continuous batching over the radix cache: plan each step, then take in what it produced.

The scheduler decides; it never runs the model. `schedule()` returns a StepPlan (which tokens of
which requests to feed, which rows to sample); the engine runs it and hands the sampled tokens
back to `update()`, which appends them, finishes requests and queues their outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.cache.radix import common_prefix_len
from radixlm.core.finish import FinishReason
from radixlm.core.limits import prompt_error
from radixlm.core.messages import TokenOutput
from radixlm.core.plan import (
    MAX_ROW_QUERIES,
    SampledReq,
    ScheduledReq,
    StepPlan,
    is_short_row,
)
from radixlm.core.request import Req
from radixlm.scheduler.admission import Admission, chunk_len
from radixlm.scheduler.budget import PrefillBudget
from radixlm.scheduler.finish import finish_reason
from radixlm.scheduler.policy import SchedulePolicy
from radixlm.scheduler.retraction import Retraction
from radixlm.scheduler.table import RequestTable
from radixlm.speculative.speculator import Speculator
from radixlm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling knobs; every one is an Engine argument but the last, the runner's."""

    context_len: int
    chunked_prefill_size: int
    max_running_requests: int
    schedule_policy: str = "lpm"
    max_wait_s: float = 10.0
    request_timeout_s: float | None = None  # a request older than this ends with an abort
    # While requests decode, a step's prefill tokens are capped to stay near this step time
    # (seconds); None: whole chunks always.
    target_itl_s: float | None = None
    # New tokens a sequence may have to be a short row of the runner's backend (put last).
    max_row_queries: int = MAX_ROW_QUERIES


class Scheduler:
    """Owns the request table and decides each step's batch."""

    def __init__(
        self,
        cache: RadixCache,
        allocator: SlotAllocator,
        tokenizer: Tokenizer,
        config: SchedulerConfig,
        speculator: Speculator | None = None,
    ) -> None:
        self.cache, self.allocator, self.tokenizer, self.config = (
            cache,
            allocator,
            tokenizer,
            config,
        )
        self.table = RequestTable(cache, allocator)
        policy = SchedulePolicy(config.schedule_policy, cache, config.max_wait_s)
        self.admission = Admission(self.table, policy, config.max_running_requests)
        self.retraction = Retraction(self.table)
        self.speculator = speculator  # None: no speculative decoding
        self._decode_rows = 0  # rows of the step last scheduled if it only decodes, else 0
        self.prefill_budget = PrefillBudget(config.chunked_prefill_size, config.target_itl_s)
        self.num_forward_passes = 0

    @property
    def waiting(self) -> list[Req]:
        """Requests queued for admission (new or retracted)."""
        return self.table.waiting

    @property
    def running(self) -> list[Req]:
        """Requests holding KV slots."""
        return self.table.running

    @property
    def num_retractions(self) -> int:
        """Requests sent back to the queue so far."""
        return self.retraction.num_retractions

    # ---- requests in and out -------------------------------------------------------------

    def check(self, req: Req) -> str | None:
        """Why req can never run here, or None."""
        return prompt_error(len(req.input_ids), self.config.context_len, self.allocator.num_slots)

    def add(self, req: Req) -> None:
        """Queue a request; one that can never run ends at once with an abort and a message. An
        output already started (a grammar's forced start) is sent now and may end it."""
        error = self.check(req)
        if error is not None:
            self.reject(req, FinishReason.abort(error))
            return
        if req.output_ids:
            req.finish_reason = finish_reason(req, self.tokenizer, self.config.context_len)
            if req.finished or len(req.output_ids) > req.num_draft:  # tokens to send now
                self.table.emit(req)
        if not req.finished:
            self.table.waiting.append(req)

    def reject(self, req: Req, reason: FinishReason) -> None:
        """End a request that was never queued (it did not fit, or its grammar failed)."""
        req.finish_reason = reason
        self.table.emit(req)

    def abort(self, rid: str, message: str = "aborted by the client") -> bool:
        """End a request wherever it is (its slots go back to the cache or the free list);
        False if no queued or running request has this rid."""
        t = self.table
        for req in t.waiting:
            if req.rid == rid:
                t.waiting.remove(req)
                self.reject(req, FinishReason.abort(message))
                return True
        for req in t.running:
            if req.rid == rid:
                t.finish(req, FinishReason.abort(message))
                return True
        return False

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.table.waiting or self.table.running or self.table.outputs)

    def take_outputs(self) -> list[TokenOutput]:
        """The outputs queued since the last call."""
        outputs, self.table.outputs = self.table.outputs, []
        return outputs

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next step: every running decode, prefill chunks under way, then new admissions,
        within the chunked-prefill token budget; retracting requests when the pool is short."""
        t = self.table
        if self.config.request_timeout_s is not None:
            self._expire(self.config.request_timeout_s)
        decodes = [r for r in t.running if r.seq_len - r.kv_len == 1]
        if decodes and not t.ensure_free(len(decodes)):
            decodes = self.retraction.retract_for(decodes)
            self.admission.on_retract()
        if decodes and self.speculator is not None:
            self.speculator.propose(decodes, self.allocator.num_free, self.config.context_len)
        batch = [t.extend(r, 1 + r.spec_draft) for r in decodes]
        decode_tokens = sum(len(b.seq.new_ids) for b in batch)
        budget = min(
            self.config.chunked_prefill_size - decode_tokens,
            self.prefill_budget.tokens(decoding=bool(decodes)),
        )
        # Chunked prefills already under way continue before anyone new is admitted.
        for r in t.running:
            pending = r.seq_len - r.kv_len
            if pending > 1 and budget > 0:
                n = chunk_len(r, r.kv_len, min(pending, budget))
                if not t.ensure_free(n):
                    break
                batch.append(t.extend(r, n))
                budget -= n
        if budget > 0 and t.waiting:
            batch.extend(self.admission.admit(budget))
        if not batch and t.running:  # nobody fits: free slots, then try again
            self.retraction.unstick()
            return self.schedule()
        # Extends first, short rows (decodes among them) last: the runner's flat layout.
        batch.sort(key=lambda s: is_short_row(s.seq, self.config.max_row_queries))
        prefill = sum(len(b.seq.new_ids) for b in batch) - decode_tokens
        self.prefill_budget.plan(prefill, decoding=bool(decodes))
        self._decode_rows = decode_tokens if prefill == 0 else 0
        return StepPlan(batch)

    def observe_step(self, seconds: float) -> None:
        """Take in the wall time of the step last scheduled (its forward and sampling): the
        prefill budget's and the speculator's step costs follow it."""
        self.prefill_budget.observe(seconds)
        if self._decode_rows and self.speculator is not None:
            self.speculator.observe_step(self._decode_rows, seconds)

    def _expire(self, timeout_s: float) -> None:
        """End the requests that have been in the engine longer than timeout_s."""
        now = time.monotonic()
        for req in [
            r for r in self.table.waiting + self.table.running if now - r.arrival > timeout_s
        ]:
            self.abort(req.rid, f"the request took longer than the {timeout_s:g} s request timeout")

    def update(self, plan: StepPlan, results: list[SampledReq]) -> None:
        """Take in what the step produced (one SampledReq per plan entry)."""
        self.num_forward_passes += 1
        self.admission.on_step()
        for s, res in zip(plan.reqs, results, strict=True):
            self._update(s, res)

    def _update(self, s: ScheduledReq, res: SampledReq) -> None:
        req, seq, t = s.req, s.seq, self.table
        if res.error is not None:
            if req.spec_draft and self.speculator is not None:
                self.speculator.discard(req)
                t.drop_kv(req, min(req.kv_len, req.seq_len - 1))
            t.finish(req, FinishReason.abort(res.error))
            return
        start, stop = s.prompt_logprobs
        if stop > start:
            req.input_logprobs.extend(res.prompt_logprobs)
            req.input_top_logprobs.extend(res.prompt_top_logprobs)
            req.input_lp_next = stop
        if seq.end < req.seq_len:  # a chunk of a longer prefill: share its progress now
            t.cache_progress(req)
            return
        if req.params.max_new_tokens == 0:
            req.finish_reason = FinishReason.at_length(0)
        elif s.num_samples:
            try:
                if req.spec_draft:
                    res = self._take_draft(req, res)
                if not req.finished:
                    self._append(req, res)
            except Exception as e:  # a bug in this request's grammar ends this request only
                logger.exception("request %s: cannot take in its token", req.rid)
                t.finish(req, FinishReason.abort(f"internal error: {type(e).__name__}: {e}"))
                return
            req.finish_reason = finish_reason(req, self.tokenizer, self.config.context_len)
        if req.finished:
            t.running.remove(req)
            t.release(req)
        elif seq.start == req.tree_len and len(seq.new_ids) > max(s.num_samples, 1):
            t.cache_progress(req)  # a fresh prefill (not a draft): siblings can match it now
        t.emit(req)

    def _take_draft(self, req: Req, res: SampledReq) -> SampledReq:
        """Keep the accepted part of req's speculative draft, token by token as if each were
        sampled alone (so an end of sequence, a stop string or the length limit among them ends
        the output there: req.finish_reason is set); returns what is left to append: the step's
        own token, the sample after the accepted drafts."""
        assert self.speculator is not None
        accepted = self.speculator.verify(req, res.tokens)
        base = len(req.output_ids) - accepted
        drafts = req.output_ids[base:]
        del req.output_ids[base:]
        for j, token in enumerate(drafts):
            req.output_ids.append(token)
            if res.logprobs:
                req.output_logprobs.append(res.logprobs[j])
                if req.top_logprobs_num:
                    req.output_top_logprobs.append(res.top_logprobs[j])
            req.finish_reason = finish_reason(req, self.tokenizer, self.config.context_len)
            if req.finished:
                if req.grammar is not None:
                    req.grammar.reject_draft(accepted - 1 - j)
                self.table.drop_kv(req, min(req.kv_len, req.seq_len - 1))
                break
        return SampledReq(
            tokens=res.tokens[accepted : accepted + 1],
            logprobs=res.logprobs[accepted : accepted + 1],
            top_logprobs=res.top_logprobs[accepted : accepted + 1],
        )

    def _append(self, req: Req, res: SampledReq) -> None:
        """Append the step's token (through the grammar: a draft verified, forced text jumped
        over); K/V is kept only for the tokens that did not change, and never for the last one:
        the next step feeds it for its logits (a rejected draft may come back as the same token,
        retokenized after the model's own)."""
        if req.grammar is not None:
            keep, tail = req.grammar.settle(req, res.tokens, self.config.context_len)
        else:
            keep, tail = len(req.output_ids), res.tokens[-1:]
        same = common_prefix_len(req.output_ids[keep:], tail, 0)
        req.output_ids[keep:] = tail
        valid = min(len(req.input_ids) + keep + same, req.seq_len - 1)
        if req.kv_len > valid:  # a draft the model did not write
            self.table.drop_kv(req, valid)
        if res.logprobs:  # such requests never jump: tail is the sampled token, or the ending
            # of a closed grammar, whose tokens the model did not choose (no logprob)
            logprob, sampled = res.logprobs[-1]
            for i, token in enumerate(tail):
                req.output_logprobs.append(
                    (logprob if i == 0 and token == sampled else None, token)
                )
                if req.top_logprobs_num:
                    req.output_top_logprobs.append(res.top_logprobs[-1] if i == 0 else [])

    # ---- cache control ---------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Empty the radix cache; refused (False) while requests run or wait."""
        if self.table.running or self.table.waiting:
            return False
        return self.cache.flush()

    def check_invariant(self) -> None:
        """Every slot has exactly one owner: free list, tree, or one request's private tail."""
        self.table.check_invariant()
