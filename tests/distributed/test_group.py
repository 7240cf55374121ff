"""A rank's collectives, two ranks as two threads of this process: all-reduce through shared
memory (small tensors) and gloo (large ones) gives every rank the same sum, the logits gather
puts the ranks' columns side by side, and a wait for a dead rank fails instead of hanging."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch

from radixlm.distributed.group import TPGroup, open_store
from radixlm.distributed.shm import MAX_NUMEL, ShmAllReduce, create_shm_file, shm_supported

T = TypeVar("T")


def on_two_ranks(fn: Callable[[int], T]) -> list[T]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, range(2)))


@pytest.fixture
def shm_file() -> Iterator[str]:
    if not shm_supported():
        pytest.skip("the shared-memory all-reduce runs on x86 only")
    path = create_shm_file(2)
    yield path
    os.unlink(path)


def test_all_reduce_and_gather(shm_file: str) -> None:
    stores = [open_store(0, 2)]
    stores.append(open_store(1, 2, stores[0].port))
    gen = torch.Generator().manual_seed(0)
    small = [torch.randn(8, 64, generator=gen) for _ in range(2)]
    large = [torch.randn(MAX_NUMEL + 1, generator=gen) for _ in range(2)]
    columns = [torch.randn(3, 5, generator=gen) for _ in range(2)]

    def rank(r: int) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
        group = TPGroup(r, 2, stores[r], torch.device("cpu"), shm_file)
        sums = []
        for step in range(3):  # both shared buffers, and the first again
            t = small[r] * (step + 1)
            group.all_reduce(t)
            sums.append(t)
        big = large[r].clone()
        group.all_reduce(big)
        sums.append(big)
        assert group.shm is not None
        return sums, group.gather_columns(columns[r], 9), group.shm.seq

    (sums0, gathered, seq), (sums1, none, _) = on_two_ranks(rank)
    for step in range(3):
        expected = (small[0] + small[1]) * (step + 1)
        torch.testing.assert_close(sums0[step], expected)
        assert torch.equal(sums0[step], sums1[step])  # the same bits on every rank
    assert torch.equal(sums0[3], large[0] + large[1]) and torch.equal(sums1[3], sums0[3])
    assert seq == 3  # the large tensor went through gloo
    assert gathered is not None and none is None
    assert torch.equal(gathered, torch.cat(columns, dim=1)[:, :9])


def test_a_wait_for_a_dead_rank_fails(shm_file: str) -> None:
    peer_alive = threading.Event()  # never set: the other rank is gone
    shm = ShmAllReduce(shm_file, 0, 2, peer_alive.is_set)
    with pytest.raises(RuntimeError, match="a tensor-parallel rank is gone"):
        shm(torch.ones(4))
