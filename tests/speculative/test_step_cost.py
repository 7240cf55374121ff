"""The step cost by rows (measured on the tiny model) and the allotment of draft tokens, checked
against a brute-force search over every way to split the drafts."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.kernels.decode import STREAM_ROWS
from radixlm.speculative.cost import (
    COST_ROWS,
    MAX_OVER,
    MIN_GAIN,
    StepCost,
    StepCostFit,
    allot,
    fit_line,
    measure_step_cost,
)


def test_step_cost_interpolates_and_validates() -> None:
    cost = StepCost((1, 4, 16), (1.0, 2.0, 8.0))
    assert [cost(r) for r in (1, 2, 4, 10, 16)] == [1.0, 4 / 3, 2.0, 5.0, 8.0]
    assert cost.max_rows == 16
    for rows, seconds in [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 2.0)), ((1, 1), (1.0, 1.0))]:
        with pytest.raises(ValueError, match="increasing row counts"):
            StepCost(rows, seconds)


def test_fit_line() -> None:
    assert fit_line([1, 2, 4], [1.0, 2.0, 4.0]) == pytest.approx((1.0, 2.0, 4.0))
    # A slow middle count (a busy machine) raises the line, never makes the counts below free.
    fitted = fit_line([1, 2, 4, 8, 16], [1.0, 1.1, 3.0, 1.4, 2.0])
    assert list(fitted) == sorted(fitted) and fitted[4] > fitted[2] > fitted[0]
    assert fit_line([1, 2], [2.0, 1.0]) == (1.5, 1.5)  # never falling
    assert fit_line([1, 2, 3, 4], [1.0, 1.0, 1.0, 10.0])[0] == 0.5  # never under half the fastest
    assert fit_line([4], [3.0]) == (3.0,)


def brute_force(
    alphas: list[float], lengths: list[int], decodes: int, rows: int, most: int, cost: StepCost
) -> float:
    """The best expected tokens per second over every split (no drafts unless they gain
    MIN_GAIN)."""
    base = decodes / cost(rows)
    best = base * (1 + MIN_GAIN)
    for split in itertools.product(*(range(n + 1) for n in lengths)):
        if not any(split) or rows + sum(split) > min(most, cost.max_rows):
            continue
        tokens = decodes + sum(
            sum(a**j for j in range(1, d + 1)) for a, d in zip(alphas, split, strict=True)
        )
        best = max(best, tokens / cost(rows + sum(split)))
    return best


def rate(split: list[int], alphas: list[float], decodes: int, rows: int, cost: StepCost) -> float:
    tokens = decodes + sum(
        sum(a**j for j in range(1, d + 1)) for a, d in zip(alphas, split, strict=True)
    )
    return tokens / cost(rows + sum(split))


@pytest.mark.parametrize("seed", range(40))
def test_allot_finds_the_best_split(seed: int) -> None:
    rng = random.Random(seed)
    # A memory-bound bend then a compute-bound slope, like a CPU's.
    bend = rng.randint(2, 12)
    cost = StepCost(
        (1, bend, 24),
        (1.0, 1.0 + 0.05 * bend, 1.0 + 0.05 * bend + (24 - bend) * rng.random() * 0.3),
    )
    n = rng.randint(1, 4)
    alphas = [rng.choice([0.0, 0.2, 0.5, 0.8, 0.95, 1.0]) for _ in range(n)]
    lengths = [rng.randint(0, 4) for _ in range(n)]
    decodes = n + rng.randint(0, 3)  # decodes without a draft candidate too
    rows = decodes + rng.randint(0, 2)  # a grammar's forced draft adds rows
    most = rng.randint(rows, 24)
    split = allot(alphas, lengths, decodes, rows, most, cost)
    assert all(0 <= d <= m for d, m in zip(split, lengths, strict=True))
    assert rows + sum(split) <= most
    best = brute_force(alphas, lengths, decodes, rows, most, cost)
    if any(split):
        assert rate(split, alphas, decodes, rows, cost) == pytest.approx(best)
    else:
        assert best == pytest.approx(decodes / cost(rows) * (1 + MIN_GAIN))


def test_allot_by_the_shape_of_the_cost() -> None:
    flat = StepCost((1, 64), (1.0, 1.0))
    linear = StepCost((1, 64), (1.0, 64.0))
    assert allot([0.9, 0.1], [4, 4], 2, 2, 64, flat) == [4, 4]  # free rows: every guess pays
    assert allot([0.99, 0.99], [4, 4], 2, 2, 64, linear) == [0, 0]  # a row costs a decode's
    assert sorted(allot([0.9, 0.9], [4, 4], 2, 2, 5, flat)) == [1, 2]  # 3 more rows fit
    assert allot([0.9], [4], 64, 64, 64, flat) == [0]  # no row left
    # Two rows free, then each costs half a step: the likelier draft gets the free ones.
    bend = StepCost((1, 4, 8), (1.0, 1.0, 3.0))
    assert allot([0.3, 0.95], [3, 3], 2, 2, 8, bend) == [0, 2]


def test_measured_cost_on_the_tiny_model(tiny_model_dir: Path) -> None:
    """Timed up to the rows whose logits do not depend on the rows beside them: the CPU
    kernels' streamed row count (past it, BLAS sums in another order)."""
    core = EngineCore(EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=300))
    cost = measure_step_cost(core.runner.forward, 300)
    assert cost.rows == COST_ROWS[: len(cost.rows)]
    if core.runner.backend.name == "cpu-kernels":
        assert cost.max_rows == STREAM_ROWS
    assert all(s > 0 for s in cost.seconds)
    assert list(cost.seconds) == sorted(cost.seconds)
    # The timed steps wrote into free slots only: the pool is whole and serves as before,
    # its padding slot (0) still zero.
    core.check_invariant()
    pool = core.runner.pool
    assert all(not t[:, 0].any() for t in (*pool.k, *pool.v))
    assert core.allocator.num_free == core.allocator.num_slots
    with torch.inference_mode():
        assert measure_step_cost(core.runner.forward, 8).rows == (1, 2, 4)


def line(a: float, b: float) -> Callable[[int], float]:
    return lambda rows: a + b * rows


def test_cost_fit_follows_the_steps_run() -> None:
    """A start-time cost from a slow spell (a large fixed part) moves to the line the steps
    run show, most of the way; with no steps seen it stays as measured."""
    measured = StepCost(COST_ROWS, tuple(line(0.030, 0.001)(r) for r in COST_ROWS))
    fit = StepCostFit(measured)
    assert fit.cost == measured
    true = line(0.010, 0.003)
    rng = random.Random(0)
    for _ in range(1000):
        rows = rng.choice([1, 2, 5, 9, 16, 40])
        fit.observe(rows, true(rows) * rng.uniform(0.95, 1.05))
    assert fit.observed == 1000
    for rows in (1, 8, 32, 64):
        before, after = abs(measured(rows) - true(rows)), abs(fit.cost(rows) - true(rows))
        assert after < 0.3 * before, rows
    assert fit.cost.rows == measured.rows  # the batch-invariant bound stays


def test_cost_fit_at_one_row_count_keeps_the_slope() -> None:
    """Steps that all have the same rows move the line to them there; the counts timed at start
    keep a slope (the least-squares line through both)."""
    measured = StepCost((1, 16, 64), (0.010, 0.025, 0.073))
    fit = StepCostFit(measured)
    for _ in range(2000):
        fit.observe(4, 0.026)  # twice the measured time at 4 rows
    slope = (fit.cost(64) - fit.cost(1)) / 63
    assert 0.0005 < slope < 0.0015
    assert fit.cost(4) == pytest.approx(0.026, rel=0.05)


def test_cost_fit_ignores_what_is_no_decode_step() -> None:
    measured = StepCost((1, 64), (0.010, 0.073))
    fit = StepCostFit(measured)
    for _ in range(100):
        fit.observe(65, 1.0)  # past the rows a step with drafts may have
        fit.observe(0, 1.0)
        fit.observe(4, -1.0)
    assert fit.observed == 0 and fit.cost == measured
    # A pause of the whole process counts as at most MAX_OVER times the estimate.
    for _ in range(16):
        fit.observe(1, 100.0)
    assert fit.cost(1) <= MAX_OVER * measured(1)


def test_engine_refits_from_its_decode_steps(tiny_model_dir: Path) -> None:
    """The engine feeds the speculator every decode step and no step with a prefill."""
    core = EngineCore(
        EngineArgs(
            model_path=str(tiny_model_dir),
            max_total_tokens=1024,
            speculative_algorithm="ngram",
        )
    )
    spec = core.speculator
    assert spec is not None and spec.cost_fit is not None
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    core.add(GenerateRequest(rid="a", input_ids=[5, 6, 7, 8] * 6, params=params))
    while core.has_work:
        core.step()
    # One step prefilled the prompt (and sampled the first token); every other only decoded.
    assert spec.cost_fit.observed == core.scheduler.num_forward_passes - 1 > 0
    core.check_invariant()
