"""Admission: which waiting requests join the next step's prefill, and how much of each."""

from __future__ import annotations

import math
import time

from radixlm.cache import MatchResult
from radixlm.core.plan import ScheduledReq
from radixlm.core.request import Req
from radixlm.scheduler.policy import SchedulePolicy
from radixlm.scheduler.table import RequestTable

# Cap on the future tokens a running request is assumed to need when admitting new work.
_RESERVE_CAP = 4096
# Requests sharing this many not-yet-cached tokens are not prefilled in the same step.
_SHARED_RUN = 32


def usable_prefix(req: Req, match: MatchResult) -> int:
    """Cached tokens a request may skip: at least one must be computed (and the token before a
    draft: its logits verify the draft), and the logits of prompt positions whose logprobs are
    still owed must be computed too."""
    prefix = min(len(match.slots), req.committed_len - 1)
    if req.wants_prompt_logprobs and req.input_lp_next < len(req.input_ids):
        prefix = min(prefix, max(req.input_lp_next - 1, 0))
    return prefix


def chunk_len(req: Req, start: int, n: int) -> int:
    """n, or n + 1 where a chunk from start would stop just before req's draft: the draft is fed
    with the token before it, whose logits verify it (one token over the budget)."""
    return n + 1 if req.num_draft and start + n == req.seq_len - 1 else n


class Admission:
    """Admits waiting requests in policy order while their chunks fit the token budget and the
    pool can still hold what the running requests are expected to generate."""

    def __init__(self, table: RequestTable, policy: SchedulePolicy, max_running: int) -> None:
        self.table, self.policy, self.max_running = table, policy, max_running
        # Share of their remaining max_new_tokens that running requests are assumed to need:
        # raised by each retraction, lowered a little each step.
        self.new_token_ratio = 0.7
        # Prompt tokens taken from the cache at first admission, by tier.
        self.hit_tokens_pool = 0
        self.hit_tokens_disk = 0

    def on_retract(self) -> None:
        """Memory ran short: reserve more for running requests."""
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)

    def on_step(self) -> None:
        """A step went through: reserve a little less."""
        self.new_token_ratio = max(0.1, self.new_token_ratio - 0.001)

    def admit(self, budget: int) -> list[ScheduledReq]:
        """Move requests from waiting to running, each with its first chunk, within budget tokens."""
        t = self.table
        if budget <= 0 or len(t.running) >= self.max_running:
            return []  # ordering would match every waiting request against the tree for nothing
        ordered, _ = self.policy.order(t.waiting)
        admitted: list[ScheduledReq] = []
        # Prompt tokens being prefilled by running requests count as computed this step too.
        seen_runs = {
            tuple(r.fill_range(r.tree_len, r.tree_len + _SHARED_RUN))
            for r in t.running
            if r.kv_len - r.tree_len >= _SHARED_RUN and r.kv_len <= len(r.input_ids)
        }
        reserve = sum(self._future_tokens(r, r.kv_len) for r in t.running)
        for req in ordered:
            if budget <= 0 or len(t.running) >= self.max_running:
                break
            salt, public_len = req.salt, req.public_len
            # A prefix on disk comes back into the pool first (a no-op without a disk tier).
            loaded = t.cache.load_prefix(req.fill_ids, salt=salt, public_len=public_len)
            # Matched again: admitting an earlier request may have evicted what ordering saw.
            match = t.cache.match_prefix(req.fill_ids, salt=salt, public_len=public_len)
            in_pool = len(match.slots) - loaded  # the loaded nodes end the matched path
            prefix = usable_prefix(req, match)
            if prefix < len(match.slots):  # lock exactly what is used: the node at depth prefix
                match = t.cache.match_prefix(
                    req.fill_ids[:prefix], salt=salt, public_len=public_len
                )
            run = tuple(req.fill_ids[prefix : prefix + _SHARED_RUN])
            if len(run) == _SHARED_RUN and run in seen_runs:
                continue  # a request admitted this step computes the same tokens: reuse them next step
            n = chunk_len(req, prefix, min(req.seq_len - prefix, budget))
            t.cache.lock(match.node)
            own = self._future_tokens(req, prefix + n)
            # With nothing running, only the chunk must fit: retraction covers the rest.
            need = n if not t.running else n + reserve + own
            if t.allocator.num_free + t.cache.evictable_size < need or not t.ensure_free(n):
                t.cache.unlock(match.node)
                break
            seen_runs.add(run)
            match.node.hits += 1
            t.waiting.remove(req)
            req.node, req.slots, req.tree_len = match.node, match.slots, match.node.depth
            if not req.admitted:
                req.cached_tokens, req.queue_time = prefix, time.monotonic() - req.arrival
                from_disk = max(0, prefix - in_pool)
                self.hit_tokens_disk += from_disk
                self.hit_tokens_pool += prefix - from_disk
            t.running.append(req)
            admitted.append(t.extend(req, n))
            budget -= n
            reserve += own
        return admitted

    def _future_tokens(self, req: Req, filled: int) -> int:
        """Slots req is expected to take once `filled` tokens have K/V: the rest of its prompt (a
        chunked prefill under way needs all of it), then a share of its remaining output, at least one token while
        it may still generate; never more than the pool could give it."""
        unfilled = req.seq_len - filled
        room = max(self.table.allocator.num_slots - req.seq_len, 0)
        output = min(req.remaining_new_tokens, _RESERVE_CAP, room)
        return unfilled + (math.ceil(output * self.new_token_ratio) if output > 0 else 0)
