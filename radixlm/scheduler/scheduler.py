"""Continuous batching over the radix cache: admit, chunk, decode, retract, finish."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from radixlm.cache import MatchResult, RadixCache, SlotAllocator
from radixlm.core.finish import FinishReason
from radixlm.core.messages import GenerateRequest, LogprobEntry, TokenOutput
from radixlm.core.plan import ScheduledSeq, is_short_row
from radixlm.core.request import Req
from radixlm.grammar import GrammarManager, GrammarSpec
from radixlm.runner.runner import ModelRunner
from radixlm.sampling import Sampler, SamplingBatch
from radixlm.scheduler.finish import finish_reason
from radixlm.scheduler.policy import SchedulePolicy
from radixlm.tokenizer import Tokenizer

# Cap on the future tokens a running request is assumed to need when admitting new work.
_RESERVE_CAP = 4096
# Requests sharing this many not-yet-cached tokens are not prefilled in the same step.
_SHARED_RUN = 32


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling knobs; every one is an Engine argument."""

    context_len: int
    chunked_prefill_size: int
    max_running_requests: int
    schedule_policy: str = "lpm"
    max_wait_s: float = 10.0


class Scheduler:
    """Owns the request table and decides each step's batch; the runner does the math."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: RadixCache,
        allocator: SlotAllocator,
        tokenizer: Tokenizer,
        config: SchedulerConfig,
        sampler: Sampler,
        grammar: GrammarManager | None = None,
    ) -> None:
        self.runner, self.cache, self.allocator = runner, cache, allocator
        self.tokenizer, self.config, self.sampler = tokenizer, config, sampler
        self.grammar = grammar if grammar is not None else GrammarManager(tokenizer)
        self.policy = SchedulePolicy(config.schedule_policy, cache, config.max_wait_s)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.pending_outputs: list[TokenOutput] = []
        self.new_token_ratio = 0.7
        self.num_retractions = 0
        self.num_forward_passes = 0

    # ---- requests in and out -------------------------------------------------------------

    def add(self, msg: GenerateRequest) -> None:
        """Queue a request; one that can never run ends at once with an abort and a message."""
        error = self._check(msg)
        eos = () if msg.params.ignore_eos else self.tokenizer.eos_token_ids
        req = Req.from_message(msg, tuple(dict.fromkeys(eos + msg.params.stop_token_ids)))
        if error is not None:
            req.finish_reason = FinishReason.abort(error)
            self.pending_outputs.append(self._output(req, []))
            return
        req.input_lp_next = max(req.logprob_start_len, 0)
        if GrammarSpec.from_params(msg.params) is not None:
            self.grammar.submit(req)  # queued by _take_compiled once its grammar is ready
            return
        self.waiting.append(req)

    def _take_compiled(self) -> None:
        """Queue the requests whose grammar is ready; a forced start of the output is sent now."""
        ready, failed = self.grammar.poll(block=not (self.waiting or self.running))
        for req, message in failed:
            req.finish_reason = FinishReason.abort(message)
            self.pending_outputs.append(self._output(req, []))
        for req in ready:
            new_ids = self.grammar.start(req, self.config.context_len)
            if req.output_ids:  # a forced start, which may end the request already
                new_ids = self._check_finish(req, new_ids)
            if new_ids:
                self.pending_outputs.append(self._output(req, new_ids))
            if not req.finished:
                self.waiting.append(req)

    def _check(self, msg: GenerateRequest) -> str | None:
        n = len(msg.input_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.config.context_len:
            return (
                f"the prompt has {n} tokens, more than the model's context length "
                f"{self.config.context_len} allows (at most {self.config.context_len - 1})"
            )
        if n + 1 > self.allocator.num_slots:
            return f"the prompt has {n} tokens and the KV pool only {self.allocator.num_slots}"
        return None

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        """End a request wherever it is; its slots go back to the cache or the free list."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid and not req.finished:
                    req.finish_reason = FinishReason.abort(message)
                    queue.remove(req)
                    self._release(req)
                    self.pending_outputs.append(self._output(req, []))
                    return
        compiling = self.grammar.discard(rid)
        if compiling is not None:
            compiling.finish_reason = FinishReason.abort(message)
            self.pending_outputs.append(self._output(compiling, []))

    @property
    def has_work(self) -> bool:
        """Whether step() would do anything."""
        return bool(
            self.waiting or self.running or self.pending_outputs or self.grammar.num_pending
        )

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        """Schedule, run one forward over the mixed batch, sample and post-process."""
        if self.grammar.num_pending:
            self._take_compiled()
        seqs = self._schedule()
        if seqs:
            self._run(seqs)
        outputs, self.pending_outputs = self.pending_outputs, []
        return outputs

    def _schedule(self) -> list[tuple[Req, ScheduledSeq]]:
        decodes = [r for r in self.running if r.seq_len - r.kv_len == 1]
        if decodes and not self._ensure_free(len(decodes)):
            decodes = self._retract_for(decodes)
        batch: list[tuple[Req, ScheduledSeq]] = []
        budget = self.config.chunked_prefill_size - len(decodes)
        for r in decodes:
            batch.append((r, self._extend(r, 1)))
        # Chunked prefills already under way continue before anyone new is admitted.
        for r in self.running:
            pending = r.seq_len - r.kv_len
            if pending > 1 and budget > 0:
                n = self._chunk_len(r, r.kv_len, min(pending, budget))
                if not self._ensure_free(n):
                    break
                batch.append((r, self._extend(r, n)))
                budget -= n
        if budget > 0 and self.waiting:
            batch.extend(self._admit(budget))
        if not batch and self.running:  # nobody fits: free slots, then try again
            self._unstick()
            return self._schedule()
        # Extends first, short rows (decodes among them) last: the runner's flat layout.
        batch.sort(key=lambda p: is_short_row(p[1]))
        return batch

    def _admit(self, budget: int) -> list[tuple[Req, ScheduledSeq]]:
        ordered, _ = self.policy.order(self.waiting)
        admitted: list[tuple[Req, ScheduledSeq]] = []
        # Prompt tokens being prefilled by running requests count as computed this step too.
        seen_runs = {
            tuple(r.fill_ids[r.tree_len : r.tree_len + _SHARED_RUN])
            for r in self.running
            if r.kv_len - r.tree_len >= _SHARED_RUN and r.kv_len <= len(r.input_ids)
        }
        reserve = self._reserved_tokens()
        for req in ordered:
            if budget <= 0 or len(self.running) >= self.config.max_running_requests:
                break
            # Matched again: admitting an earlier request may have evicted what ordering saw.
            match = self.cache.match_prefix(req.fill_ids)
            prefix = self._usable_prefix(req, match)
            if prefix < len(match.slots):  # lock exactly what is used: the node at depth prefix
                match = self.cache.match_prefix(req.fill_ids[:prefix])
            run = tuple(req.fill_ids[prefix : prefix + _SHARED_RUN])
            if len(run) == _SHARED_RUN and run in seen_runs:
                continue  # a request admitted this step computes the same tokens: reuse them next step
            n = self._chunk_len(req, prefix, min(req.seq_len - prefix, budget))
            self.cache.lock(match.node)
            own = self._future_tokens(req)
            # With nothing running, only the chunk must fit: retraction covers the rest.
            need = n if not self.running else n + reserve + own
            if self.allocator.num_free + self.cache.evictable_size < need or not self._ensure_free(
                n
            ):
                self.cache.unlock(match.node)
                break
            seen_runs.add(run)
            self.waiting.remove(req)
            req.node, req.slots, req.tree_len = match.node, match.slots, match.node.depth
            if not req.admitted:
                req.cached_tokens, req.queue_time = prefix, time.monotonic() - req.arrival
            self.running.append(req)
            admitted.append((req, self._extend(req, n)))
            budget -= n
            reserve += own
        return admitted

    def _usable_prefix(self, req: Req, match: MatchResult) -> int:
        """Cached tokens a request may skip: at least one must be computed (and the token before
        a draft: its logits verify the draft), and the logits of prompt positions whose logprobs
        are still owed must be computed too."""
        prefix = min(len(match.slots), req.committed_len - 1)
        if req.wants_prompt_logprobs and req.input_lp_next < len(req.input_ids):
            prefix = min(prefix, max(req.input_lp_next - 1, 0))
        return prefix

    def _extend(self, req: Req, n: int) -> ScheduledSeq:
        """Give req n new slots (the caller made sure they are free) and describe its chunk."""
        start = req.kv_len
        new = self.allocator.alloc(n)
        assert new is not None, "caller must ensure free slots"
        req.slots = torch.cat([req.slots, new])
        end = start + n
        logit_from = end - 1 - req.has_draft if end == req.seq_len else end
        assert logit_from >= start or end < req.seq_len, "a draft is fed with the token before it"
        if req.wants_prompt_logprobs and req.input_lp_next < len(req.input_ids):
            logit_from = min(logit_from, max(req.input_lp_next - 1, start))
        return ScheduledSeq(req.fill_ids[start:end], start, req.slots, logit_from)

    @staticmethod
    def _chunk_len(req: Req, start: int, n: int) -> int:
        """n, or n + 1 where a chunk from start would stop just before req's draft: the draft is
        fed with the token before it, whose logits verify it (one token over the budget)."""
        return n + 1 if req.has_draft and start + n == req.seq_len - 1 else n

    def _future_tokens(self, req: Req) -> int:
        """Slots req is expected to take as it decodes; never more than the pool could give it."""
        room = max(self.allocator.num_slots - req.seq_len, 0)
        return int(min(req.remaining_new_tokens, _RESERVE_CAP, room) * self.new_token_ratio)

    def _reserved_tokens(self) -> int:
        return sum(self._future_tokens(r) for r in self.running)

    def _ensure_free(self, n: int) -> bool:
        if self.allocator.num_free < n:
            self.cache.evict(n - self.allocator.num_free)
        return self.allocator.num_free >= n

    def _unstick(self) -> None:
        """Every running request needs more slots than are free (a jump-forward tail needs
        several at once, and only decodes retract): send the one with the least output back to
        the queue; one alone that still does not fit can never finish, so it is aborted."""
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        self.running.remove(victim)
        self._release(victim)
        if self.running:
            self.waiting.append(victim)
            self.num_retractions += 1
            return
        victim.finish_reason = FinishReason.abort(
            f"the request needs more than the {self.allocator.num_slots} KV slots of the pool"
        )
        self.pending_outputs.append(self._output(victim, []))

    def _retract_for(self, decodes: list[Req]) -> list[Req]:
        """Send running requests back to the queue until the rest can decode one more token."""
        victims = sorted(decodes, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        while not self._ensure_free(len(decodes)):
            victim = victims.pop(0)
            if not victims:  # alone and still no room: it can never finish in this pool
                decodes.remove(victim)
                self.running.remove(victim)
                victim.finish_reason = FinishReason.abort(
                    f"the request needs more than the {self.allocator.num_slots} KV slots of "
                    "the pool"
                )
                self._release(victim)
                self.pending_outputs.append(self._output(victim, []))
                break
            decodes.remove(victim)
            self.running.remove(victim)
            self._release(victim)
            self.waiting.append(victim)
            self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        return decodes

    def _release(self, req: Req) -> None:
        """Hand a request's KV to the tree (so its work can be reused) and drop its lock."""
        if req.node is None:
            return
        ids = req.fill_ids[: req.kv_len]
        self.cache.cache_finished(ids, req.slots, req.node)
        req.slots, req.node, req.tree_len = req.slots[:0], None, 0

    # ---- forward and post-processing -----------------------------------------------------

    def _run(self, batch: list[tuple[Req, ScheduledSeq]]) -> None:
        logits = self.runner.forward([s for _, s in batch])
        self.num_forward_passes += 1
        rows: list[tuple[Req, ScheduledSeq, int]] = []
        offset = 0
        samplers: list[tuple[Req, int]] = []
        drafts: list[tuple[Req, int]] = []  # where a draft was fed: the model's own token there
        for req, seq in batch:
            rows.append((req, seq, offset))
            if seq.end == req.seq_len and req.params.max_new_tokens > 0:
                samplers.append((req, offset + seq.num_logits - 1))
                if req.has_draft:
                    drafts.append((req, offset + seq.num_logits - 2))
            offset += seq.num_logits
        for req, seq, off in rows:
            if req.wants_prompt_logprobs and seq.num_logits:
                self._prompt_logprobs(req, seq, logits[off : off + seq.num_logits])
        sampled: dict[int, tuple[int, LogprobEntry | None, list[LogprobEntry]]] = {}
        verified: dict[int, int] = {}
        if samplers:
            sampled, verified = self._sample(samplers, drafts, logits)
        self.new_token_ratio = max(0.1, self.new_token_ratio - 0.001)
        for req, seq in batch:
            self._postprocess(req, seq, sampled.get(id(req)), verified.get(id(req)))

    def _sample(
        self, samplers: list[tuple[Req, int]], drafts: list[tuple[Req, int]], logits: torch.Tensor
    ) -> tuple[dict[int, tuple[int, LogprobEntry | None, list[LogprobEntry]]], dict[int, int]]:
        """The next token of each sampler, and the token each drafted request's model writes
        where its draft was fed (sampled as if the draft were not there: the output before it,
        the grammar before it), both by id(req). Drafts come first in the sampled rows."""
        drafted = [r for r, _ in drafts]
        reqs = [r for r, _ in samplers]
        rows = drafted + reqs
        index = torch.tensor(
            [i for _, i in drafts + samplers], dtype=torch.int64, device=logits.device
        )
        sb = SamplingBatch(
            params=[r.params for r in rows],
            output_ids=[r.output_ids[:-1] for r in drafted] + [r.output_ids for r in reqs],
            prompt_ids=[r.input_ids for r in rows],
            eos_ids=[r.eos_ids for r in rows],
            top_logprobs_num=[r.top_logprobs_num if r.return_logprob else 0 for r in rows],
            return_logprob=[r.return_logprob for r in rows],
            allowed_mask=self.grammar.fill_masks(reqs, drafted),
        )
        out = self.sampler.sample(logits.index_select(0, index), sb)
        ids = out.next_ids.tolist()
        verified = {id(r): ids[i] for i, r in enumerate(drafted)}
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        result: dict[int, tuple[int, LogprobEntry | None, list[LogprobEntry]]] = {}
        for i, r in enumerate(reqs, start=len(drafted)):
            entry: LogprobEntry | None = None
            top: list[LogprobEntry] = []
            if r.return_logprob and lps is not None:
                entry = (lps[i], ids[i])
                if r.top_logprobs_num and top_ids is not None and top_lps is not None:
                    k = r.top_logprobs_num
                    top = list(zip(top_lps[i][:k], top_ids[i][:k], strict=True))
            result[id(r)] = (ids[i], entry, top)
        return result, verified

    def _prompt_logprobs(self, req: Req, seq: ScheduledSeq, logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens req.input_lp_next.. predicted by this chunk's logit rows."""
        prompt_len = len(req.input_ids)
        if req.input_lp_next == 0:
            req.input_logprobs.append((None, req.input_ids[0]))
            if req.top_logprobs_num:
                req.input_top_logprobs.append([])
            req.input_lp_next = 1
        first = req.input_lp_next - 1  # position whose logits predict the next owed token
        last = min(seq.end, prompt_len - 1)  # positions [first, last) predict prompt tokens
        if last <= first:
            return
        rows = logits[first - seq.logit_from : last - seq.logit_from]
        targets = req.input_ids[first + 1 : last + 1]
        lp, top_ids, top_lp = gather_logprobs(rows, targets, req.top_logprobs_num)
        req.input_logprobs.extend(zip(lp, targets, strict=True))
        if req.top_logprobs_num:
            req.input_top_logprobs.extend(
                list(zip(v, i, strict=True)) for v, i in zip(top_lp, top_ids, strict=True)
            )
        req.input_lp_next = last + 1

    def _postprocess(
        self,
        req: Req,
        seq: ScheduledSeq,
        sampled: tuple[int, LogprobEntry | None, list[LogprobEntry]] | None,
        verified: int | None,
    ) -> None:
        if seq.end < req.seq_len:  # a chunk of a longer prefill: share its progress now
            self._cache_progress(req)
            return
        new_ids: list[int] = []
        if req.params.max_new_tokens == 0:
            req.finish_reason = FinishReason.at_length(0)
        elif sampled is not None:
            token, entry, top = sampled
            if req.has_draft:  # the model's own token where the draft was fed decides
                assert verified is not None
                if self.grammar.verify_draft(req, verified):
                    new_ids.append(verified)
                else:  # it writes another token there; the one sampled after the draft is moot
                    self.allocator.free(req.slots[-1:])  # the draft's: private, see Req
                    req.slots, token = req.slots[:-1], verified
            req.output_ids.append(token)
            if entry is not None:
                req.output_logprobs.append(entry)
                if req.top_logprobs_num:
                    req.output_top_logprobs.append(top)
            if req.grammar is not None:  # may retokenize the token and append forced ones
                new_ids += self.grammar.advance(req, self.config.context_len)
            else:
                new_ids.append(token)
            new_ids = self._check_finish(req, new_ids)
        if req.finished:
            self.running.remove(req)
            self._release(req)
        elif seq.start == req.tree_len and len(seq.new_ids) > 1:
            self._cache_progress(req)  # a fresh prefill: siblings waiting on it can match now
        self.pending_outputs.append(self._output(req, new_ids))

    def _cache_progress(self, req: Req) -> None:
        assert req.node is not None
        ids = req.fill_ids[: req.kv_len]
        match = self.cache.cache_unfinished(ids, req.slots, req.node)
        req.slots, req.node, req.tree_len = match.slots, match.node, match.node.depth

    def _check_finish(self, req: Req, new_ids: list[int]) -> list[int]:
        """Set req's finish reason if it is done; returns the tokens to send: new_ids, and when
        it finished, its draft (forced text, tokenized as the output ends)."""
        req.finish_reason = finish_reason(req, self.tokenizer, self.config.context_len)
        if not (req.finished and req.has_draft):
            return new_ids
        req.has_draft = False
        return [*new_ids, req.output_ids[-1]]

    def _output(self, req: Req, new_ids: list[int]) -> TokenOutput:
        out = TokenOutput(
            rid=req.rid,
            new_ids=new_ids,
            prompt_tokens=len(req.input_ids),
            cached_tokens=req.cached_tokens,
            queue_time=req.queue_time,
            finish_reason=req.finish_reason,
            output_logprobs=req.output_logprobs,
            output_top_logprobs=req.output_top_logprobs,
            input_logprobs=req.input_logprobs,
            input_top_logprobs=req.input_top_logprobs,
        )
        req.output_logprobs, req.output_top_logprobs = [], []
        req.input_logprobs, req.input_top_logprobs = [], []
        return out

    # ---- cache control ---------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Empty the radix cache; refused (False) while requests run or wait."""
        if self.running or self.waiting:
            return False
        return self.cache.flush()

    def check_invariant(self) -> None:
        """Every slot has exactly one owner: free list, tree, or one request's private tail."""
        assert all(r.kv_len <= r.committed_len for r in self.running), "a draft kept its KV"
        private = [r.slots[r.tree_len :] for r in self.running]
        owned = torch.cat([self.cache.all_slots(), self.allocator.free_slots(), *private])
        assert owned.numel() == self.allocator.num_slots, (
            f"{owned.numel()} owned slots for a pool of {self.allocator.num_slots}"
        )
        assert owned.unique().numel() == owned.numel(), "a slot has two owners"


def gather_logprobs(
    logits: torch.Tensor, targets: list[int], top_k: int
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Logprobs of `targets` under each row of logits, and each row's top_k (ids, logprobs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(targets, dtype=torch.int64, device=logits.device).unsqueeze(1)
    chosen = logp.gather(1, idx).squeeze(1).tolist()
    if top_k <= 0:
        return chosen, [], []
    vals, ids = logp.topk(top_k, dim=-1)
    return chosen, ids.tolist(), vals.tolist()
