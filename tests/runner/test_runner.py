"""KV pool sizing: mem_fraction_static is the share of the available memory that the weights and
the pool take together; a forward's slots must be the pool's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from radixlm.core.plan import ScheduledSeq, is_short_row
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.runner.runner import MIN_POOL_SLOTS, available_memory, pool_slots

GIB = 1 << 30


def test_weights_and_pool_take_the_fraction_of_available_memory() -> None:
    per_slot, weights, available = 1000, 2 * GIB, 10 * GIB
    assert pool_slots(per_slot, weights, available, "cuda", 0.5) == (5 * GIB - 2 * GIB) // 1000
    smaller = pool_slots(per_slot, weights, available, "cuda", 0.3)
    assert smaller == (3 * GIB - 2 * GIB) // 1000
    # Without a fraction: a share of what the weights leave (the CPU's is the smaller).
    cpu = pool_slots(per_slot, weights, available, "cpu", None)
    cuda = pool_slots(per_slot, weights, available, "cuda", None)
    assert cpu == int(0.15 * 8 * GIB) // 1000 and cuda == int(0.8 * 8 * GIB) // 1000


def test_a_fraction_that_leaves_no_room_for_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mem_fraction_static=0.2\).*raise --mem-fraction-static"):
        pool_slots(1000, 2 * GIB, 10 * GIB, "cuda", 0.2)  # the weights alone take 20%
    assert pool_slots(1000, 0, 1000 * MIN_POOL_SLOTS, "cpu", 1.0) == MIN_POOL_SLOTS


def _pool_size(model: Path, **args: Any) -> int:
    core = EngineCore(EngineArgs(model_path=str(model), **args))
    return core.info().max_total_num_tokens


def test_a_smaller_fraction_gives_the_engine_a_smaller_pool(tiny_model_dir: Path) -> None:
    """The engine sizes its pool from the machine's available RAM: fractions that leave about
    40 MB and 80 MB for the pool beside the tiny model's ~26 MB of weights."""
    available = available_memory(torch.device("cpu"))
    small = _pool_size(tiny_model_dir, mem_fraction_static=66e6 / available)
    large = _pool_size(tiny_model_dir, mem_fraction_static=106e6 / available)
    per_slot = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x 16 dims x float32
    assert small == pytest.approx(40e6 / per_slot, rel=0.1)
    assert large == pytest.approx(80e6 / per_slot, rel=0.1)
    # An explicit pool size wins.
    assert _pool_size(tiny_model_dir, mem_fraction_static=0.9, max_total_tokens=300) == 300


@pytest.mark.parametrize("bad", [-1, 97])
@pytest.mark.parametrize("where", ["extend", "row"])
def test_a_slot_outside_the_pool_is_refused_before_any_kernel_runs(
    tiny_model_dir: Path, bad: int, where: str
) -> None:
    """The compiled kernels write and read the pool at whatever slot ids they are given: a
    forward whose sequence names a slot outside the pool (here a pool of 96) is refused with a
    ValueError, and the pool is left as it was."""
    core = EngineCore(EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=96))
    runner = core.runner
    good = ScheduledSeq([5, 6, 7, 8], 0, torch.arange(1, 5), 3)
    runner.forward([good])
    # As bytes: the pool's unwritten slots are uninitialised memory (NaN is not equal to itself).
    before = [t.clone().view(torch.int32) for t in (*runner.pool.k, *runner.pool.v)]
    if where == "extend":  # longer than any backend's short rows
        seq = ScheduledSeq([9] * 70, 0, torch.tensor([bad, *range(1, 70)]), 69)
    else:  # one new token after the 4 cached: a short row
        seq = ScheduledSeq([9], 4, torch.tensor([1, 2, 3, 4, bad]), 4)
    assert is_short_row(seq, runner.backend.max_row_queries) == (where == "row")
    with pytest.raises(ValueError, match=rf"KV slot ids .*{bad}.* outside the pool's 0 \.\. 96"):
        runner.forward([good, seq])
    after = [t.view(torch.int32) for t in (*runner.pool.k, *runner.pool.v)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # Every slot of the pool is still usable.
    runner.forward([ScheduledSeq([9] * 96, 0, torch.arange(1, 97), 95)])


@pytest.mark.parametrize("where", ["extend", "row"])
def test_a_sequence_with_too_few_slots_is_refused(tiny_model_dir: Path, where: str) -> None:
    """A sequence must name a slot for each of its positions: one naming fewer (here its new
    tokens counted twice) is refused with a ValueError before any kernel runs (the kernels
    would read past its slots: a crash of the engine process, checked) and the pool serves on."""
    core = EngineCore(EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=128))
    runner = core.runner
    runner.forward([ScheduledSeq(list(range(5, 25)), 0, torch.arange(1, 21), 19)])
    n = 70 if where == "extend" else 3
    seq = ScheduledSeq([9] * n, 20, torch.arange(1, 21 + n - 1), 20)  # one slot short
    assert is_short_row(seq, runner.backend.max_row_queries) == (where == "row")
    with pytest.raises(
        ValueError, match=rf"{20 + n} positions \(20 cached\) has {19 + n} KV slots"
    ):
        runner.forward([seq])
    runner.forward([ScheduledSeq([9] * n, 20, torch.arange(1, 21 + n), 20)])
    core.check_invariant()
