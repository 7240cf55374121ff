"""What the scheduler asks of the runner: each request's chunk of new tokens in a step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixlm.core.images import ImageSpan
from radixlm.core.messages import LogprobEntry
from radixlm.core.request import Req

# Sequences of at most this many new tokens (decodes, jump-forward tails, speculative drafts,
# short turns after a cached prompt, short prompts) attend together as short rows instead of one
# by one; a step of such rows alone runs the decode pass where the backend has one. The torch
# backend pads every row to the longest (so few); a backend may take longer rows
# (`Backend.max_row_queries`: the compiled CPU kernels take up to a block of keys, 64).
MAX_ROW_QUERIES = 16


@dataclass(slots=True)
class ScheduledSeq:
    """What the scheduler asks of the runner for one request in one step."""

    new_ids: list[int]  # tokens to feed, at positions start .. start + len(new_ids) - 1
    start: int
    kv_slots: torch.Tensor  # int64 [start + len(new_ids)]: slots of every position, new ones last
    logit_from: int  # first position whose logits are returned; start + len(new_ids) for none
    images: tuple[ImageSpan, ...] = ()  # the request's images (positions in fill_ids)

    @property
    def end(self) -> int:
        """One past the last position fed."""
        return self.start + len(self.new_ids)

    @property
    def num_logits(self) -> int:
        """Rows of logits this sequence gets back."""
        return self.end - self.logit_from


def is_short_row(seq: ScheduledSeq, max_queries: int = MAX_ROW_QUERIES) -> bool:
    """Whether seq goes to the batched short-row attention of a backend that takes rows of up
    to `max_queries` new tokens (the runner puts these last)."""
    return len(seq.new_ids) <= max_queries


@dataclass(slots=True)
class ScheduledReq:
    """One request's part of a step: its chunk, the rows it samples, the prompt logprobs owed."""

    req: Req
    seq: ScheduledSeq
    # Rows sampled, the last of the chunk's logit rows: 0, or one per draft (the model's own
    # token where the draft was fed) and one after the whole output.
    num_samples: int
    # Prompt tokens [start, end) whose logprobs this chunk's logits give (token 0 has none).
    prompt_logprobs: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class StepPlan:
    """What one engine step computes, in the runner's order (extends first, then short rows)."""

    reqs: list[ScheduledReq]

    @property
    def seqs(self) -> list[ScheduledSeq]:
        """The runner's input."""
        return [r.seq for r in self.reqs]

    def __bool__(self) -> bool:
        return bool(self.reqs)


@dataclass(slots=True)
class SampledReq:
    """What sampling gave one ScheduledReq."""

    tokens: list[int] = field(default_factory=list)  # one per sampled row, in row order
    # When asked for: the logprob of each sampled row's token, and its top logprobs
    logprobs: list[LogprobEntry] = field(default_factory=list)
    top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    prompt_logprobs: list[LogprobEntry] = field(default_factory=list)
    prompt_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    error: str | None = None  # sampling failed for this request alone: it ends with this message
