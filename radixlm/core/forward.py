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
    """A mixed batch: extend sequences first, then short rows (decodes among them), in one flat
    token list.

    Invariant: tokens [0, num_extend_tokens) belong to `extends` in order; the tokens after that
    are the short rows' new tokens, row by row: row b's are the True entries of row_valid[b].
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    out_slots: torch.Tensor  # int64 [T]: where each token's K/V is written
    extends: list[ExtendSeq]
    num_extend_tokens: int
    row_kv: torch.Tensor | None  # int64 [B, N]: slots of each short row, padded with slot 0
    # The short rows' layout for the torch path (padded batch)...
    row_query: torch.Tensor | None  # int64 [B, Q]: each query's index among the row tokens
    row_valid: torch.Tensor | None  # bool [B, Q]: real queries (padding repeats the last one)
    row_mask: torch.Tensor | None  # bool [B, Q, N]: key n is visible to query q of row b
    # ... or, instead, for the CPU kernel: int64 [3, B], each row's first token among the row
    # tokens, its number of new tokens, and its number of keys (the new ones are the last).
    row_spans: torch.Tensor | None
    logits_index: torch.Tensor  # int64 [N]: flat positions whose logits are needed

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return int(self.input_ids.shape[0])
