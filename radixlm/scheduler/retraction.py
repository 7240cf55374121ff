"""Retraction: when the pool runs short, running requests go back to the queue, losing nothing.

A retracted request's K/V goes into the radix tree and its output is kept, so on re-admission it
matches its own work and continues; only a request that could never fit alone is aborted.
"""

from __future__ import annotations

from radixlm.core.finish import FinishReason
from radixlm.core.request import Req
from radixlm.scheduler.table import RequestTable


def _victim_order(r: Req) -> tuple[int, int]:
    """Least output first (least work lost), then the longest prompt (most slots freed)."""
    return len(r.output_ids), -len(r.input_ids)


class Retraction:
    """Frees slots for the running batch by sending requests back to the queue."""

    def __init__(self, table: RequestTable) -> None:
        self.table = table
        self.num_retractions = 0

    def retract_for(self, decodes: list[Req]) -> list[Req]:
        """Retract running requests until the rest of decodes can each decode one more token;
        returns the decodes that remain. Any running request may go back (a chunked prefill
        under way holds slots too); only one left alone that still does not fit is aborted."""
        t = self.table
        victims = sorted(t.running, key=_victim_order)
        while not t.ensure_free(len(decodes)):
            victim = victims.pop(0)
            if victim in decodes:
                decodes.remove(victim)
            if not victims:  # alone and still no room: it can never finish in this pool
                t.finish(victim, self._too_big())
                break
            self._requeue(victim)
        return decodes

    def unstick(self) -> None:
        """Every running request needs more slots than are free (a jump-forward tail needs
        several at once, and only decodes retract): send the one with the least output back to
        the queue; one alone that still does not fit can never finish, so it is aborted."""
        t = self.table
        victim = min(t.running, key=_victim_order)
        if len(t.running) == 1:
            t.finish(victim, self._too_big())
        else:
            self._requeue(victim)

    def _requeue(self, req: Req) -> None:
        t = self.table
        t.running.remove(req)
        t.release(req)
        t.waiting.append(req)
        self.num_retractions += 1

    def _too_big(self) -> FinishReason:
        return FinishReason.abort(
            f"the request needs more than the {self.table.allocator.num_slots} KV slots of the pool"
        )
