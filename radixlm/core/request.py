"""The scheduler's per-request state, and what it needs of a request's grammar."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from radixlm.cache import TreeNode
from radixlm.core.finish import FinishReason
from radixlm.core.images import ImageSpan
from radixlm.core.messages import GenerateRequest, LogprobEntry
from radixlm.core.params import SamplingParams

_EMPTY = torch.empty(0, dtype=torch.int64)


class OutputGrammar(Protocol):
    """A request's grammar state, as the scheduler sees it (radixlm.grammar.GrammarState).

    It may end the output with `num_draft` draft tokens: forced text fed to the model before the
    model chose it, verified by the logits at the draft's position (jump-forward).
    """

    @property
    def num_draft(self) -> int:
        """How many of the last output tokens are unverified drafts."""
        ...

    @property
    def error(self) -> str | None:
        """Why the grammar rejected the output; None while it is fine."""
        ...

    @property
    def is_terminated(self) -> bool:
        """Whether the output is complete (nothing but end-of-sequence may follow)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the output was ended by budget-aware closing (complete, but the budget is what
        ended it)."""
        ...

    def settle(self, req: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        """The output after this step's samples, as an edit (keep, tail): output_ids[keep:] becomes
        tail. sampled holds the model's token at each draft's position, then after the output.
        The caller must apply the edit to req.output_ids before anything else reads it."""
        ...


@dataclass(slots=True, eq=False)
class Req:
    """A request from admission to finish.

    Invariant: `slots[i]` holds the K/V of `fill_ids[i]` for i < kv_len; slots[:tree_len] belong
    to the radix tree (locked through `node`), the rest are this request's private tail.
    Between steps kv_len <= committed_len: a jump-forward draft has K/V only during the step
    that verifies it, so it never enters the tree (the scheduler caches only up to kv_len).
    output_ids[:num_sent] have been sent and never change.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...]
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    slots: torch.Tensor = field(default_factory=lambda: _EMPTY)
    node: TreeNode | None = None
    tree_len: int = 0
    cached_tokens: int = 0  # prompt tokens served from the cache at (first) admission
    finish_reason: FinishReason | None = None
    arrival: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # seconds from arrival to first admission
    # logprobs waiting to be sent with the next output
    input_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    input_lp_next: int = 0  # next prompt token whose logprob is owed
    num_sent: int = 0  # output tokens already sent to the frontend
    grammar: OutputGrammar | None = None  # set once compiled; has accepted all of output_ids
    images: tuple[ImageSpan, ...] = ()  # image positions in input_ids (pad ids, see core.images)
    salt: str | None = None  # cache namespace (RadixCache.match_prefix)
    public_len: int = 0  # leading tokens matched in the shared namespace despite the salt

    @classmethod
    def from_message(cls, msg: GenerateRequest, model_eos: Sequence[int]) -> Req:
        """Build from a GenerateRequest; model_eos are the model's end-of-sequence ids."""
        eos = () if msg.params.ignore_eos else tuple(model_eos)
        return cls(
            rid=msg.rid,
            input_ids=list(msg.input_ids),
            params=msg.params,
            eos_ids=tuple(dict.fromkeys(eos + msg.params.stop_token_ids)),
            return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num,
            input_lp_next=max(msg.logprob_start_len, 0),
            images=msg.images,
            salt=msg.cache_salt,
        )

    @property
    def admitted(self) -> bool:
        """Whether the request has been scheduled at least once (a retracted one has)."""
        return self.queue_time is not None

    @property
    def fill_ids(self) -> list[int]:
        """Prompt plus generated tokens: what the KV must cover before the next sample."""
        return self.input_ids + self.output_ids

    def fill_range(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end], without building all of fill_ids (a decode reads one token)."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    @property
    def seq_len(self) -> int:
        """Length of fill_ids without building it."""
        return len(self.input_ids) + len(self.output_ids)

    @property
    def num_draft(self) -> int:
        """How many of the last output tokens are unverified drafts (see OutputGrammar)."""
        return 0 if self.grammar is None else self.grammar.num_draft

    @property
    def committed_len(self) -> int:
        """Tokens of fill_ids that no later step will change: all but the drafts."""
        return self.seq_len - self.num_draft

    @property
    def kv_len(self) -> int:
        """Tokens whose K/V sit in the pool."""
        return int(self.slots.shape[0])

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt-token logprobs were asked for."""
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.input_ids)

    @property
    def remaining_new_tokens(self) -> int:
        """Tokens it may still generate."""
        return self.params.max_new_tokens - len(self.output_ids)
