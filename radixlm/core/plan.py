"""What the scheduler asks of the runner: each request's chunk of new tokens in a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Sequences with a cached prefix and at most this many new tokens (decodes, jump-forward tails,
# short turns after a cached prompt) attend together in one padded batch instead of one by one.
MAX_ROW_QUERIES = 16


@dataclass(slots=True)
class ScheduledSeq:
    """What the scheduler asks of the runner for one request in one step."""

    new_ids: list[int]  # tokens to feed, at positions start .. start + len(new_ids) - 1
    start: int
    kv_slots: torch.Tensor  # int64 [start + len(new_ids)]: slots of every position, new ones last
    logit_from: int  # first position whose logits are returned; start + len(new_ids) for none

    @property
    def end(self) -> int:
        """One past the last position fed."""
        return self.start + len(self.new_ids)

    @property
    def num_logits(self) -> int:
        """Rows of logits this sequence gets back."""
        return self.end - self.logit_from


def is_short_row(seq: ScheduledSeq) -> bool:
    """Whether seq goes to the batched short-row attention (the runner puts these last)."""
    return seq.start > 0 and len(seq.new_ids) <= MAX_ROW_QUERIES
