"""Cascade attention's groups: short rows whose slots start with the same cached prefix, which
the row attention then reads once for the whole group instead of once per row (the prefix's
attention for all the group's queries in one pass, each row's own keys apart, the two merged by
their log-sum-exp; `RowBatch` in row_attention.h)."""

from __future__ import annotations

import torch

# A group pays from this many rows and this many shared keys (docs/benchmarks.md, "Cascade
# attention"): below them the per-row attention is as fast.
MIN_ROWS = 4
MIN_PREFIX = 256
# The most rows one prefix task takes: a larger group is split so that its tasks share out
# among the threads.
MAX_ROWS = 8


def shared_prefixes(
    kv: torch.Tensor,
    starts: torch.Tensor,
    min_rows: int = MIN_ROWS,
    min_prefix: int = MIN_PREFIX,
    max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, int] | None:
    """The groups of rows (kv [B, N] each row's slots, starts [B] its cached keys before its
    new tokens) that share at least `min_prefix` cached slots, `min_rows` rows or more, as
    `KernelRowLayout.groups` and their number; None where there is none.

    Two rows holding the same slot at one position hold the same slots up to it: a slot has one
    owner, so a slot in two rows is a node of the radix tree, and a node fixes its path from the
    root. So rows are grouped by their slot at position min_prefix - 1, and each group's prefix
    runs on while all its rows agree (never into a row's new tokens)."""
    eligible = torch.nonzero(starts >= min_prefix).flatten()
    if len(eligible) < min_rows:
        return None
    by_slot: dict[int, list[int]] = {}
    marks = kv[:, min_prefix - 1].index_select(0, eligible).tolist()
    for b, slot in zip(eligible.tolist(), marks, strict=True):
        by_slot.setdefault(slot, []).append(b)
    starts_list = starts.tolist()
    group_start, prefixes, members = [0], [], []
    row_prefix = [0] * kv.shape[0]
    for group in by_slot.values():
        if len(group) < min_rows:
            continue
        end = min(starts_list[b] for b in group)
        tail = kv[:, min_prefix:end].index_select(0, torch.tensor(group))
        differs = (tail != tail[0]).any(0).nonzero()
        prefix = min_prefix + (int(differs[0]) if len(differs) else tail.shape[1])
        parts = -(-len(group) // max_rows)
        for i in range(parts):  # evenly sized parts
            part = group[i * len(group) // parts : (i + 1) * len(group) // parts]
            members += part
            prefixes.append(prefix)
            group_start.append(len(members))
            for b in part:
                row_prefix[b] = prefix
    if not prefixes:
        return None
    flat = torch.tensor(group_start + prefixes + members + row_prefix, dtype=torch.int64)
    return flat, len(prefixes)
