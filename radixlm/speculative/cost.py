"""What a decode step costs by the rows it feeds, measured on the machine at start and refit
from the decode steps the engine runs, and the draft lengths that make a step give the most
tokens per second.

A draft row is worth its expected accepted tokens; what it costs depends on the machine. On a
CPU a step of a few rows streams the weights once (rows nearly free) and a larger one is
compute-bound (every row costs its share); on a GPU the bend comes far later. The shape of that
curve, not a constant, decides how many rows a batch of decodes may verify.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from radixlm.core.plan import MAX_ROW_QUERIES, ScheduledSeq

logger = logging.getLogger(__name__)

# Row counts a step is timed at (others are interpolated); past the last, no drafts: the CPU
# decode pass takes up to 64 tokens, and a batch that large gains nothing from guesses.
COST_ROWS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Tokens of context each timed row attends to (a typical short chat's).
COST_CONTEXT = 128
COST_REPS = 4
# A draft must raise the step's expected tokens per second by this share: the estimates of
# acceptance and cost are rough, and a guess that only breaks even is not worth the rows.
MIN_GAIN = 0.03


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds of a decode step by its rows (decodes plus draft tokens), linear between the
    measured row counts, non-decreasing; rows past the last measured count are not costed."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if (
            not self.rows
            or len(self.rows) != len(self.seconds)
            or list(self.rows) != sorted(set(self.rows))
        ):
            raise ValueError("a step cost needs increasing row counts, one time each")

    @property
    def max_rows(self) -> int:
        """The most rows a step with drafts may have."""
        return self.rows[-1]

    def __call__(self, rows: int) -> float:
        """Seconds of a step of this many rows (1 <= rows <= max_rows)."""
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        r0, r1, s0, s1 = self.rows[i - 1], self.rows[i], self.seconds[i - 1], self.seconds[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    def describe(self) -> str:
        """One line for the log: milliseconds by rows."""
        return ", ".join(
            f"{r}: {s * 1000:.1f}" for r, s in zip(self.rows, self.seconds, strict=True)
        )


def measure_step_cost(
    forward: Callable[[list[ScheduledSeq]], torch.Tensor], num_slots: int
) -> StepCost:
    """Time decode steps of COST_ROWS rows through `forward` (a runner's) over a pool of
    num_slots, every slot free: the timed steps write K/V into the first slots, so this must
    run before any request holds one. Each count keeps its fastest of COST_REPS interleaved
    runs (a shared machine only ever adds time), and the cost is the least-squares line through
    those, never falling with rows: one slow count on a busy machine would otherwise make the
    counts below it look free, and guesses that rarely hit would be fed.

    Row counts stop where a row's logits first depend on the rows beside it (the CPU kernels
    sum every row in the same order up to STREAM_ROWS rows, and hand larger steps to BLAS): a
    draft verified past it could turn a near tie the other way, and greedy output would no
    longer be the output without drafts. A backend that is never batch-invariant (a GPU's) has
    no such bound: its decodes already depend on their batch."""
    max_rows = max(1, min(COST_ROWS[-1], num_slots // 2))
    context = min(COST_CONTEXT, num_slots - max_rows)
    counts = [r for r in COST_ROWS if r <= max_rows]
    with torch.inference_mode():
        # The context the timed rows attend to, computed once (the pool holds no garbage).
        forward([ScheduledSeq(list(range(100, 100 + context)), 0, _slots(0, context), context)])
        first = forward(_rows(1, context))[0]
        exact = counts
        for i, rows in enumerate(counts[1:], start=1):  # also warms threads and caches
            if not torch.equal(forward(_rows(rows, context))[0], first):
                exact = counts[:i]
                break
        if len(exact) > 1:
            counts = exact
        best = dict.fromkeys(counts, float("inf"))
        for _ in range(COST_REPS):
            for rows in counts:
                batch = _rows(rows, context)
                t0 = time.perf_counter()
                forward(batch)[-1, 0].item()  # waits for an asynchronous device
                best[rows] = min(best[rows], time.perf_counter() - t0)
    cost = StepCost(tuple(counts), fit_line(counts, [best[r] for r in counts]))
    logger.info("decode step cost by rows (ms): %s", cost.describe())
    return cost


def fit_line(rows: Sequence[int], seconds: Sequence[float]) -> tuple[float, ...]:
    """The least-squares line through (rows, seconds) at each row count, with a slope of at
    least 0 and no value under half the fastest time."""
    line = _Line()
    for r, s in zip(rows, seconds, strict=True):
        line.add(r, s, 1.0)
    return line.at(rows, min(seconds) / 2)


@dataclass(slots=True)
class _Line:
    """Weighted sums of (rows, seconds) points, and the least-squares line through them."""

    w: float = 0.0
    wr: float = 0.0
    wrr: float = 0.0
    ws: float = 0.0
    wrs: float = 0.0

    def add(self, rows: float, seconds: float, weight: float) -> None:
        self.w += weight
        self.wr += weight * rows
        self.wrr += weight * rows * rows
        self.ws += weight * seconds
        self.wrs += weight * rows * seconds

    def scale(self, factor: float) -> None:
        self.w, self.wr, self.wrr, self.ws, self.wrs = (
            v * factor for v in (self.w, self.wr, self.wrr, self.ws, self.wrs)
        )

    def plus(self, other: _Line) -> _Line:
        return _Line(
            self.w + other.w,
            self.wr + other.wr,
            self.wrr + other.wrr,
            self.ws + other.ws,
            self.wrs + other.wrs,
        )

    def at(self, rows: Sequence[int], floor: float) -> tuple[float, ...]:
        """The line's value at each row count (a slope of at least 0, values of at least floor)."""
        mean_r, mean_s = self.wr / self.w, self.ws / self.w
        spread = self.wrr - self.w * mean_r * mean_r
        slope = (self.wrs - self.w * mean_r * mean_s) / spread if spread > 1e-12 * self.w else 0.0
        return tuple(max(mean_s + max(slope, 0.0) * (r - mean_r), floor) for r in rows)


# The step cost follows the decode steps the engine runs: each row count timed at start weighs
# as much as PRIOR_WEIGHT observed steps (the timed counts reach the most rows, so they keep a
# slope while every step seen has had about the same rows), an observed step's weight fades by
# OBSERVED_FADE a step (the line follows the last few hundred), and the line is refit every
# REFIT_STEPS observed steps.
PRIOR_WEIGHT = 1.0
OBSERVED_FADE = 0.995
REFIT_STEPS = 16
# An observed step counts as at most this many times the line's estimate for its rows: a pause
# of the whole process (a neighbour's burst, a page fault storm) says nothing about rows.
MAX_OVER = 2.0


class StepCostFit:
    """The step cost measured at start, refit from the wall times of the decode steps the
    engine runs (forward and sampling: what a draft row really adds), so that drafting follows
    the machine's speed and the workload's contexts rather than one timing at start."""

    def __init__(self, measured: StepCost) -> None:
        self.measured = measured
        self.cost = measured
        self.observed = 0  # decode steps taken in
        self._prior = _Line()
        for r, s in zip(measured.rows, measured.seconds, strict=True):
            self._prior.add(r, s, PRIOR_WEIGHT)
        self._seen = _Line()
        self._pending = 0
        self._fastest = min(measured.seconds)

    def observe(self, rows: int, seconds: float) -> StepCost:
        """Take in a decode step of `rows` rows (decodes and draft tokens, no prefill) that took
        `seconds`; returns the cost to allot by from now on."""
        if not 1 <= rows <= self.cost.max_rows or seconds <= 0:
            return self.cost
        self._seen.scale(OBSERVED_FADE)
        self._seen.add(rows, min(seconds, MAX_OVER * self.cost(rows)), 1.0)
        self._fastest = min(self._fastest, seconds)
        self.observed += 1
        self._pending += 1
        if self._pending >= REFIT_STEPS:
            self._pending = 0
            line = self._prior.plus(self._seen)
            fitted = line.at(self.measured.rows, self._fastest / 2)
            self.cost = StepCost(self.measured.rows, fitted)
        return self.cost


def _slots(start: int, end: int) -> torch.Tensor:
    """The pool's slots of positions start .. end - 1 of the timed steps (slot 0 pads)."""
    return torch.arange(start + 1, end + 1)


def _rows(rows: int, context: int) -> list[ScheduledSeq]:
    """A decode step of `rows` new tokens: one decode, then sequences of up to 4 (drafts), all
    attending to the same `context` slots and writing their own after them (the first row is
    the same in every such step)."""
    seqs, start = [], context
    while start < context + rows:
        n = 1 if start == context else min(4, context + rows - start, MAX_ROW_QUERIES)
        slots = torch.cat([_slots(0, context), _slots(start, start + n)])
        seqs.append(ScheduledSeq(list(range(200, 200 + n)), context, slots, context))
        start += n
    return seqs


def allot(
    alphas: Sequence[float],
    lengths: Sequence[int],
    decodes: int,
    rows: int,
    most: int,
    cost: StepCost,
) -> list[int]:
    """Draft tokens to feed per candidate (at most lengths[i]) in a step of `decodes` decodes
    feeding `rows` rows without these drafts, with at most `most` rows in all, maximising the
    step's expected tokens per second. Candidate i's draft token j (from 1) is accepted with
    probability alphas[i] ** j (each token given the ones before it), so it adds that many
    expected tokens; the step costs cost(rows + drafted). Drafts are fed only if they raise the
    step's rate by MIN_GAIN."""
    gains = sorted(
        (
            (a**j, i)
            for i, (a, n) in enumerate(zip(alphas, lengths, strict=True))
            for j in range(1, n + 1)
        ),
        reverse=True,
    )
    room = min(most, cost.max_rows) - rows
    out = [0] * len(alphas)
    if room <= 0:
        return out
    best_rate, best_d, tokens = decodes / cost(rows) * (1 + MIN_GAIN), 0, float(decodes)
    for d, (gain, _) in enumerate(gains[:room], start=1):
        tokens += gain
        rate = tokens / cost(rows + d)
        if rate > best_rate:
            best_rate, best_d = rate, d
    for _, i in gains[:best_d]:
        out[i] += 1
    return out
