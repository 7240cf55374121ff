"""The linear layers' GEMM (radixlm/kernels/gemm.py): every candidate equals F.linear; the
fastest per range of row counts wins, once, and is cached; a forced one is used everywhere; a
model's logits and an engine's greedy tokens under each equal the torch backend's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from radixlm.core.plan import ScheduledSeq
from radixlm.engine.engine import Engine
from radixlm.kernels.backend import choose_backend
from radixlm.kernels.build import blas_sgemm, isa_variants, load_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.gemm import (
    FEW_ROWS,
    FIXED,
    FIXED_OPENBLAS,
    Gemm,
    GemmChoice,
    choose_gemm,
    fixed_rule,
    measure,
    onednn_available,
)
from radixlm.kernels.torch_backend import TorchBackend
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

pytestmark = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler")

CPU = torch.device("cpu")


def _backend(gemm: str = "auto") -> CpuKernelBackend:
    lib = load_kernels()
    assert lib is not None
    return CpuKernelBackend(lib, gemm)


GEMMS = sorted(_backend().gemm_candidates()) if load_kernels() is not None else []
# Row counts on both sides of each range's bounds (4 and 64) and of the kernels' blocking
# (four columns, 16-float vectors); weights with odd sizes and an inner size that is not a
# multiple of any vector width.
ROWS = [0, 1, 3, 4, 5, 17, 32, 33, 64, 65, 130]
SHAPES = [(203, 96), (96, 40), (130, 576), (1, 64)]


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_every_gemm_equals_f_linear(gemm: str, n: int, k: int) -> None:
    """With and without a bias, over contiguous inputs and row or column slices of larger
    ones, for prepared weights and one `prepare` never saw (as the LM head)."""
    gen = torch.Generator().manual_seed(n * k)
    w, other = torch.randn(n, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    backend = _backend(gemm)
    backend.prepare([w])
    assert backend.gemm_choice == GemmChoice.forced(gemm)
    for rows in ROWS:
        inputs = [
            torch.randn(rows, k, generator=gen),
            torch.randn(2 * rows, k, generator=gen)[::2],  # every other row
            torch.randn(rows, k + 8, generator=gen)[:, 3 : 3 + k],  # a column slice
        ]
        for x in inputs:
            for weight, b in ((w, None), (w, bias), (other, None)):
                got = backend.linear(x, weight, b)
                torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN")
def test_a_weight_changed_after_prepare_is_not_read_from_its_packed_copy() -> None:
    backend = _backend("onednn")
    w = torch.randn(64, 32)
    backend.prepare([w])
    x = torch.randn(100, 32)
    torch.testing.assert_close(backend.linear(x, w), F.linear(x, w))
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(backend.linear(x, w), F.linear(x, w))


def _candidates(fast: dict[str, Callable[[int], bool]]) -> dict[str, Callable[..., Gemm]]:
    """Fake candidates, each F.linear, but 40 times over at the row counts it is slow at."""

    def make(is_fast: Callable[[int], bool]) -> Callable[[torch.Tensor], Gemm]:
        def prepare(w: torch.Tensor) -> Gemm:
            def gemm(x: torch.Tensor) -> torch.Tensor:
                for _ in range(1 if is_fast(x.shape[0]) else 40):
                    y = F.linear(x, w)
                return y

            return gemm

        return prepare

    return {name: make(is_fast) for name, is_fast in fast.items()}


def test_the_fastest_gemm_wins_each_range_of_row_counts() -> None:
    choice = measure(
        _candidates(
            {
                "stream": lambda rows: rows <= 4,
                "mkl": lambda rows: 4 < rows <= 64,
                "onednn": lambda rows: rows > 64,
            }
        ),
        [(96, 64), (32, 96)],
    )
    assert (choice.few, choice.decode, choice.prefill) == ("stream", "mkl", "onednn")
    assert choice.source == "measured"
    for name, winner in (("few", "stream"), ("decode", "mkl"), ("prefill", "onednn")):
        figures = choice.gflops[name]
        assert max(figures, key=figures.__getitem__) == winner
    assert [choice.for_rows(r) for r in (1, FEW_ROWS, FEW_ROWS + 1, 64, 65, 4096)] == [
        *("stream", "stream", "mkl", "mkl", "onednn", "onednn")
    ]


def test_a_measured_choice_is_cached_per_shapes_unless_the_machine_was_busy(
    tmp_cache_dir: Path,
) -> None:
    prepared: list[tuple[int, ...]] = []

    def counting(make: Callable[[torch.Tensor], Gemm]) -> Callable[[torch.Tensor], Gemm]:
        def prepare(w: torch.Tensor) -> Gemm:
            prepared.append(tuple(w.shape))
            return make(w)

        return prepare

    candidates = _candidates({"stream": lambda rows: rows <= 4, "mkl": lambda rows: rows > 4})
    counted = {name: counting(make) for name, make in candidates.items()}
    shapes = [(96, 64), (96, 64), (32, 96)]

    def quiet() -> bool:
        return False

    def busy() -> bool:
        return True

    assert choose_gemm(counted, shapes, busy=busy).source == "measured"
    prepared.clear()
    first = choose_gemm(counted, shapes, busy=quiet)
    assert first.source == "measured" and prepared, "measured on a busy machine: not cached"
    prepared.clear()
    again = choose_gemm(counted, shapes, busy=busy)
    assert again.source == "cached" and not prepared, "a cached choice measures nothing"
    assert (again.few, again.decode, again.prefill) == (first.few, first.decode, first.prefill)
    assert again.gflops == first.gflops
    assert choose_gemm(counted, [(96, 64)], busy=quiet).source == "measured", "other shapes"
    assert prepared


def test_a_forced_gemm_is_used_for_every_row_count_and_an_unknown_one_refused() -> None:
    candidates = _candidates({"mkl": lambda rows: True})
    assert choose_gemm(candidates, [(8, 8)], "mkl") == GemmChoice.forced("mkl")
    with pytest.raises(ValueError, match="not available"):
        choose_gemm(candidates, [(8, 8)], "onednn")
    with pytest.raises(ValueError, match="not available"):
        _backend("blas")


def test_the_environment_forces_the_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXLM_GEMM", "mkl")
    backend = choose_backend(CPU, torch.float32, torch.float32)
    assert isinstance(backend, CpuKernelBackend)
    assert backend.gemm_choice == GemmChoice.forced("mkl")
    assert backend.gemm.startswith(f"mkl (1-{FEW_ROWS} rows), mkl (-64), mkl (65+); forced")
    monkeypatch.setenv("RADIXLM_GEMM", "fastest")
    with pytest.raises(ValueError, match="RADIXLM_GEMM must be"):
        choose_backend(CPU, torch.float32, torch.float32)
    assert choose_backend(torch.device("cuda"), torch.float32, torch.float32).gemm == "F.linear"


def test_without_the_environment_nothing_is_timed_or_packed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default is the fixed rule (streamed up to 64 rows; beyond, the kernels' per-thread
    OpenBLAS where installed, else MKL): prepare times nothing and keeps no second copy of the
    weights."""
    monkeypatch.delenv("RADIXLM_GEMM", raising=False)
    monkeypatch.delenv("RADIXLM_BLAS", raising=False)
    backend = choose_backend(CPU, torch.float32, torch.float32)
    assert isinstance(backend, CpuKernelBackend) and backend.blas is not None
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    with monkeypatch.context() as m:
        m.setattr("radixlm.kernels.gemm.measure", lambda *a: pytest.fail("timed"))
        backend.prepare(weights)
    openblas = backend.blas.name.startswith("OpenBLAS")
    assert backend.gemm_choice == (FIXED_OPENBLAS if openblas else FIXED)
    beyond = "stream" if openblas else "mkl"
    assert backend.gemm == (
        f"stream (1-{FEW_ROWS} rows), stream (-64), {beyond} (65+); fixed; "
        f"sgemm: {backend.blas.name}"
    )
    assert all(packed is None for _, _, packed in backend._prepared.values())


def test_the_kernels_blas_is_openblas_where_installed_and_the_environment_picks_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenBLAS (the scipy-openblas32 wheel, a dependency) comes first; `RADIXLM_BLAS=mkl`
    takes torch's MKL and its fixed rule (MKL's F.linear beyond 64 rows); an unknown name is
    refused. OpenBLAS runs one thread a call, on the kernels' threads."""
    monkeypatch.delenv("RADIXLM_BLAS", raising=False)
    openblas = blas_sgemm("openblas")
    if openblas is None:
        pytest.skip("scipy-openblas32 is not installed")
    assert blas_sgemm() == openblas and openblas.name.startswith("OpenBLAS 0.3.")
    assert fixed_rule(openblas.name) == FIXED_OPENBLAS
    monkeypatch.setenv("RADIXLM_BLAS", "mkl")
    backend = choose_backend(CPU, torch.float32, torch.float32)
    assert isinstance(backend, CpuKernelBackend) and backend.blas is not None
    assert backend.blas.name == "MKL" and backend.gemm_choice == FIXED
    assert fixed_rule(None) == FIXED
    monkeypatch.setenv("RADIXLM_BLAS", "atlas")
    with pytest.raises(ValueError, match="RADIXLM_BLAS must be one of openblas, mkl"):
        choose_backend(CPU, torch.float32, torch.float32)


def _forward_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Logits of prefills (more than 64 rows in one forward), then decode batches of 1, 8 and
    40 short rows, and one of 70, over scattered slots."""
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 70, 33] + [3] * 67
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lengths]
    slots = torch.split(torch.randperm(1024, generator=gen)[: sum(lengths) + 70] + 1, 1)
    cursor = iter(slots)
    seqs = []
    for p in prompts:
        seqs.append((p, torch.cat([next(cursor) for _ in range(len(p) + 1)])))
    out = [runner.forward([ScheduledSeq(p, 0, s[: len(p)], 0) for p, s in seqs[:3]])]
    out.append(runner.forward([ScheduledSeq(p, 0, s[: len(p)], len(p) - 1) for p, s in seqs[3:]]))
    for batch in (1, 8, 40, 70):
        out.append(
            runner.forward([ScheduledSeq([p[0]], len(p), s, len(p)) for p, s in seqs[:batch]])
        )
    return out


@pytest.mark.parametrize("gemm", [*GEMMS, "auto"])
def test_a_model_gives_the_torch_logits_with_each_gemm(gemm: str, tiny_model_dir: Path) -> None:
    """Prefills in the prefill range, decode batches in each range (through the decode pass
    up to FEW_ROWS tokens and where the pass's own GEMM is chosen for their row count, else layer by
    layer)."""
    config, weights = load_model_files(str(tiny_model_dir))
    runners = [
        ModelRunner(config, weights, CPU, torch.float32, 1100, backend=backend)
        for backend in (TorchBackend(), _backend(gemm))
    ]
    decode_pass = runners[1].model.decode_pass
    if decode_pass is not None and gemm != "auto":
        # Up to FEW_ROWS tokens always in the pass; beyond, only where its own GEMM is the
        # choice.
        tokens = (1, 4, 8, 40, 70)
        assert [decode_pass.takes(t) for t in tokens] == [
            t <= FEW_ROWS or gemm == "stream" for t in tokens
        ]
    want, got = (_forward_steps(r) for r in runners)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("gemm", GEMMS)
def test_an_engine_decodes_the_torch_tokens_with_each_gemm(
    gemm: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    params = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    prompts = [ids, ids[:7], ids[5:30]] * 3  # nine rows decode together
    outputs = {}
    for name, env in (("torch", {"RADIXLM_CPU_KERNELS": "0"}), (gemm, {"RADIXLM_GEMM": gemm})):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with Engine(str(tiny_model_dir), max_total_tokens=1024, random_seed=0) as engine:
                assert engine.info.kernel_backend == ("torch" if name == "torch" else "cpu-kernels")
                outs = engine.generate(input_ids=prompts, sampling_params=params)
                outputs[name] = [o["output_ids"] for o in outs]
                engine.check_invariant()
    assert outputs[gemm] == outputs["torch"]


@pytest.mark.parametrize(
    "flags", list(isa_variants().values()), ids=lambda f: " ".join(f) or "native"
)
def test_fma_peak_bounds_a_gemm(flags: tuple[str, ...]) -> None:
    """The cores' FMA peak that `bench_engine.py gemm` sets each GEMM against is a real ceiling:
    positive on every vector build, and on this CPU's own build not outrun by a float32 GEMM
    at prefill size (MKL), beyond a shared machine's drift between the two timings."""
    lib = load_kernels(flags)
    assert lib is not None
    peak = max(CpuKernelBackend(lib).fma_peak() for _ in range(3))
    assert peak > 0
    if flags:
        return  # the path another CPU takes: its peak is not this CPU's
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    F.linear(x, w)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    gemm = 2 * x.shape[0] * w.shape[0] * w.shape[1] / best / 1e9
    assert gemm < 1.5 * peak, (gemm, peak)
