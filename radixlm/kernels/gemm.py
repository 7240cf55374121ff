"""The GEMM of a float32 model's linear layers on the CPU, chosen once at start by timing the
candidates on the model's weight shapes at a few row counts: oneDNN over a prepacked weight
(what inductor's freezing emits), MKL through `F.linear`, and the compiled kernel that streams
the weight for a few rows and splits the columns among the threads (the decode pass's GEMM).

The choice holds per range of row counts (`RANGES`). The decision is cached in the radixlm
cache, keyed by the CPU's flags, torch's version, the thread count and the shapes, so later
starts on the same machine skip the timing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from radixlm.kernels.build import cpu_flags
from radixlm.utils import atomic_write, cache_dir

logger = logging.getLogger(__name__)

# The candidates, cheapest in memory first (ties go to the earlier one): `stream` and `mkl`
# read the model's own weights, `onednn` keeps a prepacked copy of each.
GEMMS = ("stream", "mkl", "onednn")
# The most rows of the "few" range: a decode batch of a few requests.
FEW_ROWS = 16
# The ranges of row counts a choice holds for: (name, most rows, rows it is timed at). Decode
# batches are a few rows or a few dozen; prefill chunks hundreds to thousands.
RANGES = (("few", FEW_ROWS, 1), ("decode", 64, 32), ("prefill", None, 512))
# The prefill probe's rows shrink for large layers so that one timed call stays short.
_PROBE_FLOPS = 4e9
# Per range: seconds of timed rounds, and the fewest and most rounds. Few rows are cheap to
# time, so they get many rounds, which a shared machine's noise needs.
_BUDGETS = {"few": (0.15, (5, 40)), "decode": (0.15, (5, 40)), "prefill": (0.5, (2, 5))}
_CACHE_VERSION = 2

Gemm = Callable[[torch.Tensor], torch.Tensor]


def onednn_available() -> bool:
    """Whether torch has the oneDNN ops that run a prepacked linear weight."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [n, k] in oneDNN's own layout for its inner product (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) over the weight as `onednn_pack` returned it; x [rows, k]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@dataclass(frozen=True, slots=True)
class GemmChoice:
    """Which GEMM runs a linear layer of how many rows, and how it was decided."""

    few: str  # up to FEW_ROWS rows
    decode: str  # up to 64 rows
    prefill: str  # more
    # "measured", "cached" (measured by an earlier start), "forced", "fixed" or "bfloat16 weights"
    source: str
    gflops: dict[str, dict[str, float]] = field(default_factory=dict)  # range -> GEMM -> GF/s

    @classmethod
    def forced(cls, gemm: str) -> GemmChoice:
        """The same GEMM for every row count."""
        return cls(gemm, gemm, gemm, "forced")

    def for_rows(self, rows: int) -> str:
        """The GEMM for a linear layer over `rows` rows."""
        if rows <= FEW_ROWS:
            return self.few
        return self.decode if rows <= 64 else self.prefill

    @property
    def packs(self) -> bool:
        """Whether the weights need a prepacked copy."""
        return "onednn" in (self.few, self.decode, self.prefill)

    def describe(self) -> str:
        """One line for the startup log and /server_info."""
        ranges = f"{self.few} (1-{FEW_ROWS} rows), {self.decode} (-64), {self.prefill} (65+)"
        return f"{ranges}; {self.source}"

    def figures(self) -> str:
        """The measured GFLOP/s per range, for the log."""
        return "; ".join(
            f"{name}: " + ", ".join(f"{g} {v:.0f}" for g, v in sorted(row.items()))
            for name, row in self.gflops.items()
        )


# The rule without timing: a few rows to a decode batch stream the weight (the decode pass's
# GEMM); prefill chunks take the kernels' per-thread OpenBLAS where it is installed (1.07-1.20x
# MKL's threaded `F.linear` on Zen 3's prefill shapes, docs/benchmarks.md), else MKL.
FIXED = GemmChoice("stream", "stream", "mkl", "fixed")
FIXED_OPENBLAS = GemmChoice("stream", "stream", "stream", "fixed")


def fixed_rule(blas: str | None) -> GemmChoice:
    """The GEMMs by row count without timing, where the kernels call this BLAS's `sgemm`
    ("OpenBLAS ..." or "MKL", `build.Sgemm.name`; None without one)."""
    return FIXED_OPENBLAS if blas is not None and blas.startswith("OpenBLAS") else FIXED


# bfloat16 weights: streamed (widened to float32 in registers, or native dot products) up to
# 64 rows, so that a decode step reads half the bytes of float32. Beyond, on a CPU with native
# bfloat16, torch's bfloat16 GEMM (oneDNN: 3x float32 MKL on Zen 4); on one without, torch
# emulates it at a sixth of float32's speed, so each weight is widened to float32 for the call
# and float32's prefill GEMM multiplies ("widen": with MKL 0.8-1.0x float32 weights from 128
# rows on Zen 3, docs/benchmarks.md). Nothing is timed: the rule follows the CPU's flags.
BF16 = GemmChoice("stream", "stream", "torch", "bfloat16 weights")
BF16_WIDENED = GemmChoice("stream", "stream", "widen", "bfloat16 weights, no native bfloat16")


def bf16_rule(native: bool) -> GemmChoice:
    """The GEMMs of bfloat16 weights on a CPU with (or without) native bfloat16 products."""
    return BF16 if native else BF16_WIDENED


def probe_rows(shapes: Sequence[tuple[int, int]]) -> dict[str, int]:
    """The row count each range is timed at, for a layer of these weight shapes [n, k]."""
    flops = 2 * sum(n * k for n, k in shapes)
    rows = {name: probe for name, _, probe in RANGES}
    rows["prefill"] = max(64, min(rows["prefill"], int(_PROBE_FLOPS / flops)))
    return rows


def time_gemms(
    candidates: dict[str, Callable[[torch.Tensor], Gemm]],
    shapes: Sequence[tuple[int, int]],
    rows: int,
    budget_s: float = 0.2,
    repeats: tuple[int, int] = (3, 25),
) -> dict[str, float]:
    """Median seconds per candidate to run one GEMM of each shape [n, k] over `rows` rows of
    random data. The candidates take turns in a shuffled order each round, so a neighbour's
    load on a shared machine falls on all of them alike; after a warm-up round, rounds go on
    until `budget_s` is spent, at least repeats[0] and at most repeats[1] of them.
    `candidates` maps a name to a function that prepares a weight and returns its GEMM."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
    inputs = [torch.randn(rows, k, generator=gen) for _, k in shapes]
    gemms = {name: [make(w) for w in weights] for name, make in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    rng = random.Random(rows)
    deadline = None
    for round_ in range(repeats[1] + 1):  # round 0 warms each candidate up
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for gemm, x in zip(gemms[name], inputs, strict=True):
                gemm(x)
            if round_:
                times[name].append(time.perf_counter() - start)
        if deadline is None:
            deadline = time.perf_counter() + budget_s
        elif round_ >= repeats[0] and time.perf_counter() > deadline:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    candidates: dict[str, Callable[[torch.Tensor], Gemm]], shapes: Sequence[tuple[int, int]]
) -> GemmChoice:
    """Time the candidates on these shapes at each range's probe rows; the fastest wins."""
    winners: dict[str, str] = {}
    gflops: dict[str, dict[str, float]] = {}
    per_row = 2 * sum(n * k for n, k in shapes)
    for name, rows in probe_rows(shapes).items():
        seconds = time_gemms(candidates, shapes, rows, *_BUDGETS[name])
        winners[name] = min(seconds, key=lambda g: (seconds[g], GEMMS.index(g)))
        gflops[name] = {g: per_row * rows / s / 1e9 for g, s in seconds.items()}
    return GemmChoice(winners["few"], winners["decode"], winners["prefill"], "measured", gflops)


def machine_busy() -> bool:
    """Whether more processes wanted a core than there are cores, over the last minute."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def choose_gemm(
    candidates: dict[str, Callable[[torch.Tensor], Gemm]],
    shapes: Sequence[tuple[int, int]],
    forced: str = "auto",
    busy: Callable[[], bool] = machine_busy,
    fixed: GemmChoice = FIXED,
    blas: str = "",
) -> GemmChoice:
    """The GEMM per range for a model whose linear layers have these weight shapes [n, k]:
    `forced` ("auto" to choose by timing, else one of `candidates` for every row count), or a
    decision cached by an earlier start with the same CPU, torch, threads and shapes, or a new
    measurement (then cached, unless `busy()` says the machine was busier than its cores);
    "fixed" is the rule `fixed` without timing. `blas` names the `sgemm` the candidates call
    (part of the cache key)."""
    if forced == "fixed":
        return fixed
    if forced != "auto":
        if forced not in candidates:
            raise ValueError(
                f"GEMM {forced!r} is not available here: choose from {sorted(candidates)} or auto"
            )
        return GemmChoice.forced(forced)
    distinct = sorted(set(shapes))
    key = hashlib.sha256(
        json.dumps(
            [
                _CACHE_VERSION,
                cpu_flags(),
                torch.__version__,
                torch.get_num_threads(),
                sorted(candidates),
                blas,
                distinct,
            ]
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "gemm" / f"{key}.json"
    try:
        saved = json.loads(path.read_text())
        return GemmChoice(
            saved["few"], saved["decode"], saved["prefill"], "cached", saved["gflops"]
        )
    except (OSError, ValueError, KeyError):
        pass
    choice = measure(candidates, distinct)
    if busy():
        # Other work on every core skews the timings (a parallel GEMM waits on its slowest
        # thread): the choice serves this start only, and the next start measures again.
        logger.info("GEMM choice not cached: the machine was busier than its cores")
        return choice
    record = {
        "few": choice.few,
        "decode": choice.decode,
        "prefill": choice.prefill,
        "gflops": choice.gflops,
    }
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record)))
    except OSError as e:  # a read-only cache: measure again next time
        logger.warning("could not cache the GEMM choice: %s", e)
    return choice


def forced_gemm() -> str:
    """`RADIXLM_GEMM` from the environment: fixed (the default: the weight streamed up to 64
    rows, per-thread OpenBLAS or else MKL beyond, nothing timed or packed: `fixed_rule`),
    auto (timed at start, see `choose_gemm`), or one GEMM for all rows.

    The timed choice is opt-in until a measurement on a quiet machine shows it faster end to
    end: on a shared machine its timings disagreed from start to start, its oneDNN copies cost
    a second copy of the weights, and oneDNN chosen at 512 rows lost to MKL at 4,096."""
    value = os.environ.get("RADIXLM_GEMM", "fixed") or "fixed"
    if value not in ("fixed", "auto", *GEMMS):
        raise ValueError(
            f"RADIXLM_GEMM must be fixed, auto or one of {', '.join(GEMMS)}; got {value!r}"
        )
    return value
