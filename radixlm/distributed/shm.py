"""All-reduce of small CPU tensors through shared memory, for ranks on one x86 machine: gloo's
loopback TCP costs a round trip per call (~0.7 ms on a busy 2-core machine), paid 2 x layers
times a decode step.

Layout of the shared file: one counter per rank (64 bytes apart), then float32 slots
[rank, 2, max_numel]. A call writes the tensor into the rank's slot of buffer `seq % 2`, sets
its counter to `seq`, waits until every counter has reached `seq`, and sums the slots in rank
order, so every rank gets the same bits. A rank starts writing buffer b again only after it
saw every counter at the call in between, which every rank sets only after reading b: the
two buffers alternate safely. Visibility rests on x86's store order (the data's stores are
seen before the counter's); other CPUs use gloo."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable

import torch

_COUNTER_BYTES = 64  # one cache line per counter
# Tensors up to this many elements go through shared memory (decode batches; a prefill chunk's
# activations are larger and go to gloo, where the transfer is small next to the GEMMs).
MAX_NUMEL = 1 << 20
# A wait checks the counters this many times in a row, then sleeps this long between checks.
_SPINS = 20
_SLEEP_S = 50e-6
# Seconds between checks that the other ranks are alive while waiting for them.
_ALIVE_CHECK_S = 0.05


def shm_supported() -> bool:
    """Whether this CPU orders stores as the protocol needs (x86)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def create_shm_file(size: int) -> str:
    """A new zeroed file for a group of `size` ranks, in /dev/shm where there is one."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="radixlm-tp-", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.truncate(shm_bytes(size))
    return path


def shm_bytes(size: int) -> int:
    """The shared file's length for `size` ranks."""
    return size * _COUNTER_BYTES + size * 2 * MAX_NUMEL * 4


class ShmAllReduce:
    """One rank's view of the shared file; `alive()` says whether the other ranks still run (a
    wait for a dead one raises instead of spinning for ever)."""

    def __init__(self, path: str, rank: int, size: int, alive: Callable[[], bool]) -> None:
        self.rank, self.size, self.alive = rank, size, alive
        buf = torch.from_file(path, shared=True, size=shm_bytes(size), dtype=torch.uint8)
        head = size * _COUNTER_BYTES
        self.counters = buf[:head].view(torch.int64).view(size, _COUNTER_BYTES // 8)[:, 0]
        self.data = buf[head:].view(torch.float32).view(size, 2, MAX_NUMEL)
        self.seq = 0

    def __call__(self, t: torch.Tensor) -> None:
        """Sum `t` (contiguous, at most MAX_NUMEL elements) over the ranks, in place."""
        n = t.numel()
        self.seq += 1
        slots = self.data[:, self.seq & 1, :n]
        slots[self.rank].copy_(t.view(-1))
        self.counters[self.rank] = self.seq
        next_check = time.monotonic() + _ALIVE_CHECK_S
        spins = 0
        while int(self.counters.min()) < self.seq:
            spins += 1
            if spins > _SPINS:  # sleep: a waiting rank must not take the core a peer needs
                time.sleep(_SLEEP_S)
            if time.monotonic() > next_check:
                if not self.alive():
                    raise RuntimeError("a tensor-parallel rank is gone")
                next_check = time.monotonic() + _ALIVE_CHECK_S
        t.view(-1).copy_(slots.sum(0))
