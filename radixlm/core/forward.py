"""The forward batch: everything one model forward needs, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixlm.core.images import ImageFill


@dataclass(slots=True)
class ExtendSeq:
    """One request's chunk of new tokens (prefill or jump-forward) in the flat token list."""

    q_start: int  # offset of its first new token in the flat batch
    q_len: int
    prefix_len: int  # tokens whose K/V are already in the pool before this forward
    kv_slots: torch.Tensor  # int64 [prefix_len + q_len]: the request's slots, position by position


@dataclass(slots=True)
class TorchRowLayout:
    """The short rows padded to one batch, as the torch backend's row attention reads them."""

    kv: torch.Tensor  # int64 [B, N]: each row's slots, padded with slot 0
    query: torch.Tensor  # int64 [B, Q]: each query's index among the row tokens
    valid: torch.Tensor  # bool [B, Q]: real queries (padding repeats the row's last one)
    mask: torch.Tensor  # bool [B, Q, N]: key n is visible to query q of row b


@dataclass(slots=True)
class KernelRowLayout:
    """The short rows as the compiled CPU kernels read them: no padding of the queries."""

    kv: torch.Tensor  # int64 [B, N]: each row's slots, padded with slot 0
    # int64 [3, B]: each row's first token among the row tokens, its number of new tokens, and
    # its number of keys (the new ones are the last).
    spans: torch.Tensor
    window: int = (
        0  # the model's sliding window (a query sees this many keys, itself last); 0: none
    )


# The short rows' attention metadata, in the layout of the backend that built the batch.
RowLayout = TorchRowLayout | KernelRowLayout


@dataclass(slots=True)
class KernelExtends:
    """Extends as the compiled CPU kernels' extend attention reads them: int64 [N, 4] rows of
    (first token among the step's, new tokens, cached prefix, offset of its first slot in
    `slots`), and the rows of K/V those slots name, prefix and new tokens in order."""

    seqs: torch.Tensor
    slots: torch.Tensor


@dataclass(slots=True)
class KernelExtendLayout:
    """The extends in the compiled CPU kernels' layout, in two calls: those with no cached
    prefix attend over this step's K/V (their slots are the step's token indices), the others
    over the pool."""

    fresh: KernelExtends | None
    cached: KernelExtends | None


@dataclass(slots=True)
class ForwardBatch:
    """A mixed batch: extend sequences first, then short rows (decodes among them), in one flat
    token list.

    Invariant: tokens [0, num_extend_tokens) belong to `extends` in order; the tokens after that
    are the short rows' new tokens, row by row.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    out_slots: torch.Tensor  # int64 [T]: where each token's K/V is written
    extends: list[ExtendSeq]
    num_extend_tokens: int
    rows: RowLayout | None  # None when the batch has no short rows
    logits_index: torch.Tensor  # int64 [N]: flat positions whose logits are needed
    # The model's sliding window: a token attends to itself and the window - 1 positions before
    # it. None: to every position before it.
    window: int | None = None
    # Image positions among the flat tokens, and which rows of which image's features they take.
    images: list[ImageFill] = field(default_factory=list)
    # The extends in the backend's own layout, where its extend attention takes them all.
    extend_layout: KernelExtendLayout | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return int(self.input_ids.shape[0])
