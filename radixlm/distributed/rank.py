"""What every rank of a tensor-parallel group shares: its start message, its device and
one forward step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixlm.core.plan import ScheduledSeq
from radixlm.distributed.group import TPGroup


@dataclass(frozen=True)
class RankSpec:
    """What a worker rank needs to build its part (rank 0 sends it first)."""

    model_path: str
    rank: int
    size: int
    port: int  # rank 0's TCP store, on loopback
    device: str  # rank 0's device; rank r takes the r-th GPU after it
    dtype: torch.dtype
    kv_dtype: torch.dtype
    num_slots: int
    threads: int
    log_level: int
    shm_path: str | None  # the shared-memory all-reduce's file (CPU ranks on x86), if any


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's, or the same CPU."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def rank_forward(
    forward: Callable[[list[ScheduledSeq]], torch.Tensor],
    group: TPGroup,
    seqs: list[ScheduledSeq],
    vocab_size: int,
) -> torch.Tensor | None:
    """Run this rank's share of one forward (`forward`: its runner's, whose all-reduces meet the
    other ranks'); rank 0 gets the whole logits, the others None. Every rank must call it with
    the same `seqs`."""
    partial = forward(seqs)
    if partial.shape[0] == 0:  # nothing to gather; every rank knows it from seqs
        return partial.new_empty(0, vocab_size) if group.rank == 0 else None
    return group.gather_columns(partial, vocab_size)
