"""The request table: who is waiting, who is running, the KV slots they own, their outputs."""

from __future__ import annotations

import torch

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.core.finish import FinishReason
from radixlm.core.messages import TokenOutput
from radixlm.core.plan import ScheduledReq, ScheduledSeq
from radixlm.core.request import Req


class RequestTable:
    """Requests and their slots. Every KV slot is in exactly one place: the allocator's free
    list, the radix tree, or one running request's private tail (`check_invariant`)."""

    def __init__(self, cache: RadixCache, allocator: SlotAllocator) -> None:
        self.cache, self.allocator = cache, allocator
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.outputs: list[TokenOutput] = []  # sent at the end of the step

    def ensure_free(self, n: int) -> bool:
        """Evict unlocked tree leaves until n slots are free; False if they cannot be."""
        if self.allocator.num_free < n:
            self.cache.evict(n - self.allocator.num_free)
        return self.allocator.num_free >= n

    def extend(self, req: Req, n: int) -> ScheduledReq:
        """Give req n new slots (the caller made sure they are free) and describe its chunk."""
        start = req.kv_len
        new = self.allocator.alloc(n)
        assert new is not None, "caller must ensure free slots"
        req.slots = torch.cat([req.slots, new])
        end = start + n
        at_end = end == req.seq_len
        # Every draft is verified by the logits of the position before it.
        logit_from = end - 1 - req.num_draft if at_end else end
        assert logit_from >= start or not at_end, "a draft is fed with the token before it"
        owed = req.wants_prompt_logprobs and req.input_lp_next < len(req.input_ids)
        if owed:
            logit_from = min(logit_from, max(req.input_lp_next - 1, start))
        seq = ScheduledSeq(req.fill_range(start, end), start, req.slots, logit_from, req.images)
        num_samples = 1 + req.num_draft if at_end and req.params.max_new_tokens > 0 else 0
        scheduled = ScheduledReq(req, seq, num_samples)
        if req.wants_prompt_logprobs and seq.num_logits:
            first = req.input_lp_next
            scheduled.prompt_logprobs = (first, max(first, min(end + 1, len(req.input_ids))))
        return scheduled

    def drop_kv(self, req: Req, keep: int) -> None:
        """Free req's slots past position keep (tokens that changed; always private)."""
        assert keep >= req.tree_len, "tree-owned K/V never changes"
        self.allocator.free(req.slots[keep:])
        req.slots = req.slots[:keep]

    def cache_progress(self, req: Req) -> None:
        """Put req's computed tokens into the tree now, so that siblings can match them."""
        assert req.node is not None
        match = self.cache.cache_unfinished(
            req.fill_ids[: req.kv_len],
            req.slots,
            req.node,
            salt=req.salt,
            public_len=req.public_len,
        )
        req.slots, req.node, req.tree_len = match.slots, match.node, match.node.depth

    def release(self, req: Req) -> None:
        """Hand a request's KV to the tree (so its work can be reused) and drop its lock."""
        if req.node is None:
            return
        self.cache.cache_finished(
            req.fill_ids[: req.kv_len],
            req.slots,
            req.node,
            salt=req.salt,
            public_len=req.public_len,
        )
        req.slots, req.node, req.tree_len = req.slots[:0], None, 0

    def finish(self, req: Req, reason: FinishReason) -> None:
        """End a running request now: its KV goes to the tree, its last output is queued."""
        req.finish_reason = reason
        self.running.remove(req)
        self.release(req)
        self.emit(req)

    def emit(self, req: Req) -> None:
        """Queue req's output: its committed tokens not sent yet (all, once it has finished, a
        final draft included: forced text, tokenized as the output ends; none when aborted)."""
        reason = req.finish_reason
        done = reason is not None and not reason.is_abort
        end = len(req.output_ids) - (0 if done else req.num_draft)
        new_ids = req.output_ids[req.num_sent : end]
        req.num_sent = max(req.num_sent, end)
        self.outputs.append(
            TokenOutput(
                rid=req.rid,
                new_ids=new_ids,
                prompt_tokens=len(req.input_ids),
                cached_tokens=req.cached_tokens,
                queue_time=req.queue_time,
                finish_reason=reason,
                output_logprobs=req.output_logprobs,
                output_top_logprobs=req.output_top_logprobs,
                input_logprobs=req.input_logprobs,
                input_top_logprobs=req.input_top_logprobs,
            )
        )
        req.output_logprobs, req.output_top_logprobs = [], []
        req.input_logprobs, req.input_top_logprobs = [], []

    def check_invariant(self) -> None:
        """Every slot has exactly one owner: free list, tree, or one request's private tail."""
        assert all(r.kv_len <= r.committed_len for r in self.running), "a draft kept its KV"
        private = [r.slots[r.tree_len :] for r in self.running]
        owned = torch.cat([self.cache.all_slots(), self.allocator.free_slots(), *private])
        assert owned.numel() == self.allocator.num_slots, (
            f"{owned.numel()} owned slots for a pool of {self.allocator.num_slots}"
        )
        assert owned.unique().numel() == owned.numel(), "a slot has two owners"
