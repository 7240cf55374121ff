"""The forward batch: everything one model forward needs, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ExtendSeq:
    """One request's chunk of new tokens (prefill or jump-forward) in the flat token list."""

    q_start: int  # offset of its first new token in the flat batch
    q_len: int
    prefix_len: int  # tokens whose K/V are already in the pool before this forward
    kv_slots: torch.Tensor  # int64 [prefix_len + q_len]: the request's slots, position by position


@dataclass(slots=True)
class ForwardBatch:
    """A mixed batch: extend sequences first, then single-token decodes, in one flat token list.

    Invariant: tokens [0, num_extend_tokens) belong to `extends` in order; tokens after that are
    one decode token per row of `decode_kv`.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    out_slots: torch.Tensor  # int64 [T]: where each token's K/V is written
    extends: list[ExtendSeq]
    num_extend_tokens: int
    decode_kv: torch.Tensor | None  # int64 [B, max_len]: slots of each decode row, padded with 0
    decode_mask: torch.Tensor | None  # bool [B, 1, 1, max_len]: True where a real slot is
    logits_index: torch.Tensor  # int64 [N]: flat positions whose logits are needed

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return int(self.input_ids.shape[0])


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
