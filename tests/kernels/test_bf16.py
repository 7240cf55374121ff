"""The compiled CPU kernels over bfloat16 weights: each op against float32 math on the same
(bfloat16) weights, the model against its float32 self and the plain torch bfloat16 path, the
decode pass against the layers one by one, and an engine's greedy tokens."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from radixlm.core.plan import ScheduledSeq
from radixlm.engine.engine import Engine
from radixlm.kernels.backend import choose_backend
from radixlm.kernels.build import BLAS, blas_sgemm, isa_variants, load_kernels, native_bf16
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.gemm import BF16, BF16_WIDENED, bf16_rule
from radixlm.kernels.torch_backend import TorchBackend
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

pytestmark = pytest.mark.skipif(
    load_kernels() is None, reason="no C++ compiler to build the CPU kernels"
)

CPU = torch.device("cpu")
BF = torch.bfloat16
VARIANTS = list(isa_variants().values())


def _widening_flags() -> tuple[str, ...]:
    """Flags of a build that widens bfloat16 weights to float32 (this CPU's own build where it
    has no AVX512-BF16): its products are float32 math on the bfloat16 weights."""
    lib = load_kernels()
    return ("-mno-avx512bf16",) if lib is not None and lib.radixlm_native_bf16_dot() else ()


def _backend(flags: tuple[str, ...] = ()) -> CpuKernelBackend:
    lib = load_kernels(flags)
    assert lib is not None
    return CpuKernelBackend(lib)


def _rounded(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights rounded to bfloat16 and held in float32: what a bfloat16 model computes with
    once its weights are widened."""
    return {name: w.to(BF).float() for name, w in weights.items()}


def test_a_bfloat16_model_on_the_cpu_gets_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADIXLM_CPU_KERNELS", raising=False)
    for kv_dtype in (torch.float32, BF):
        assert isinstance(choose_backend(CPU, BF, kv_dtype), CpuKernelBackend)


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    ("rows", "k"), [(1, 96), (3, 96), (17, 96), (70, 96), (5, 40), (1, 1552), (17, 1552)]
)
def test_a_streamed_bfloat16_weight_equals_float32_math(
    rows: int, k: int, threads: int, flags: tuple[str, ...]
) -> None:
    """Any number of rows streams a bfloat16 weight (widened, or with AVX512-BF16 multiplied
    natively after rounding x to bfloat16; float32 sums), with a tail of columns, uneven thread
    shares, k not a multiple of 32 or of the vector width (plain loop), and rows longer than the
    768 floats taken at once (in chunks)."""
    gen = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(203, k, generator=gen).to(BF)
    bias = torch.randn(203, generator=gen).to(BF)
    backend = _backend(flags)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = backend.stream_linear(x, w)
    finally:
        torch.set_num_threads(saved)
    native = backend.native_bf16_dot and k % 32 == 0
    want = F.linear((x.to(BF) if native else x).double(), w.double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    # The op a model calls on its layers' weights: streamed up to 64 rows; beyond, torch's
    # bfloat16 GEMM where the CPU has native bfloat16 (its inputs rounded to bfloat16: a
    # bfloat16 tolerance), the weight widened to float32 where it has not (float32 math).
    backend.prepare([w])
    op = backend.linear(x, w, bias)
    assert op.dtype == torch.float32
    exact = F.linear(x.double(), w.double()) + bias.double()
    rounds = native if rows <= 64 else native_bf16()
    tol = 0.05 if rounds else 1e-4
    torch.testing.assert_close(op.double(), exact, atol=tol, rtol=1e-2)


@pytest.mark.parametrize("blas", [b for b in BLAS if blas_sgemm(b) is not None])
@pytest.mark.parametrize("native", [True, False], ids=["native", "widened"])
@pytest.mark.parametrize("rows", [8, 65, 300])
def test_bfloat16_prefill_gemms_follow_the_cpu(
    native: bool, rows: int, blas: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 64 rows a bfloat16 weight takes torch's bfloat16 GEMM on a CPU with native
    bfloat16 (x rounded to bfloat16), and on one without is widened to float32 for float32's
    prefill GEMM (the kernels' per-thread OpenBLAS, or MKL; torch would emulate bfloat16
    products at a sixth of float32's speed): float32 math on the bfloat16 weight, for
    prepared weights and others (the LM head) alike."""
    monkeypatch.setattr("radixlm.kernels.cpu.native_bf16", lambda: native)
    backend = CpuKernelBackend(load_kernels(_widening_flags()), blas=blas)
    assert backend.bf16_rule == (BF16 if native else BF16_WIDENED)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    prepared, other = (torch.randn(130, 96, generator=gen).to(BF) for _ in range(2))
    bias = torch.randn(130, generator=gen).to(BF)
    backend.prepare([prepared])
    assert backend.gemm_choice == backend.bf16_rule
    for w in (prepared, other):
        got = backend.linear(x, w, bias).double()
        exact = F.linear(x.double(), w.double()) + bias.double()
        rounded = F.linear(x.to(BF).double(), w.double()) + bias.double()
        if rows > 64 and native:
            torch.testing.assert_close(got, rounded, atol=0.05, rtol=1e-2)
        else:
            torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-5)
            assert (rounded - exact).abs().max() > 1e-3  # the check above tells them apart


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
def test_norms_with_bfloat16_weights_equal_float32_math(flags: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(7, 576, generator=gen), torch.randn(7, 576, generator=gen)
    weight = torch.randn(576, generator=gen).to(BF)
    backend, ref = _backend(flags), TorchBackend()
    torch.testing.assert_close(
        backend.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight.float(), 1e-5)
    )
    want_norm, want_res = ref.add_rms_norm(x, res.clone(), weight.float(), 1e-5)
    got_norm, got_res = backend.add_rms_norm(x, res.clone(), weight, 1e-5)
    torch.testing.assert_close(got_norm, want_norm)
    torch.testing.assert_close(got_res, want_res)


def _steps(runner: ModelRunner, most_rows: int) -> list[torch.Tensor]:
    """Logits of prefills (forwards of at most `most_rows` tokens), then decode batches of 1, 8
    and 40 short rows (the decode pass) and, where `most_rows` allows, 70 (layer by layer), over
    scattered slots."""
    gen = torch.Generator().manual_seed(7)
    lengths = [most_rows - 20, 12, 8] + [3] * 67
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lengths]
    slots = iter(torch.split(torch.randperm(1300, generator=gen) + 1, 1))
    seqs = [(p, torch.cat([next(slots) for _ in range(len(p) + 1)])) for p in prompts]
    out = [runner.forward([ScheduledSeq(p, 0, s[: len(p)], 0) for p, s in seqs[:3]])]
    per = most_rows // 3
    for i in range(3, len(seqs), per):
        group = seqs[i : i + per]
        out.append(runner.forward([ScheduledSeq(p, 0, s[: len(p)], len(p) - 1) for p, s in group]))
    for batch in (1, 8, 40, 70):
        if batch <= most_rows:
            out.append(
                runner.forward([ScheduledSeq([p[0]], len(p), s, len(p)) for p, s in seqs[:batch]])
            )
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, BF])
def test_bfloat16_kernels_compute_float32_math_on_the_bfloat16_weights(
    kv_dtype: torch.dtype, tiny_model_dir: Path
) -> None:
    """Where every GEMM streams (up to 64 rows a forward), a bfloat16 model on the kernels that
    widen its weights computes what a float32 model on the rounded weights computes in torch."""
    config, weights = load_model_files(str(tiny_model_dir))
    backend = _backend(_widening_flags())
    assert not backend.native_bf16_dot
    kernels = ModelRunner(config, weights, CPU, BF, 1400, kv_dtype=kv_dtype, backend=backend)
    assert isinstance(kernels.backend, CpuKernelBackend)
    assert kernels.backend.gemm_choice == bf16_rule(native_bf16())
    assert kernels.model.decode_pass is not None
    ref = ModelRunner(
        config, _rounded(weights), CPU, torch.float32, 1400, kv_dtype, backend=TorchBackend()
    )
    got, want = _steps(kernels, 60), _steps(ref, 60)
    # With bfloat16 K/V, short rows (decodes, prompts of up to 64 tokens) read their keys back
    # from the rounded pool, where each path rounds in its own order: up to ~2.2e-3 apart.
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=3e-3 if kv_dtype == BF else 1e-4, rtol=0)


def test_bfloat16_kernels_are_within_bfloat16_tolerance_of_float32_and_of_torch(
    tiny_model_dir: Path,
) -> None:
    """With prefills past 64 rows (torch's bfloat16 GEMM, or widened weights), the logits stay
    within a bfloat16
    tolerance of the float32 model's, no further from them than the plain torch bfloat16
    path's, and within tolerance of that path's."""
    config, weights = load_model_files(str(tiny_model_dir))
    runs = {
        "float32": ModelRunner(config, weights, CPU, torch.float32, 1400, backend=TorchBackend()),
        "torch": ModelRunner(config, weights, CPU, BF, 1400, backend=TorchBackend()),
        "kernels": ModelRunner(config, weights, CPU, BF, 1400),
    }
    assert isinstance(runs["kernels"].backend, CpuKernelBackend)
    out = {name: _steps(r, 150) for name, r in runs.items()}
    for f32, torch_bf16, kernels in zip(*out.values(), strict=True):
        scale = f32.abs().max().item()
        kernel_err = (kernels - f32).abs().max().item()
        assert kernel_err <= 0.02 * scale
        assert kernel_err <= 1.5 * (torch_bf16 - f32).abs().max().item()
        torch.testing.assert_close(kernels, torch_bf16, atol=0.03 * scale, rtol=0)


def test_the_bfloat16_decode_pass_equals_the_layers_one_by_one(tiny_model_dir: Path) -> None:
    config, weights = load_model_files(str(tiny_model_dir))
    fused = ModelRunner(config, weights, CPU, BF, 1400)
    layered = ModelRunner(config, weights, CPU, BF, 1400)
    layered.model.fused_decode = False
    assert fused.model.decode_pass is not None and layered.model.decode_pass is None
    for g, w in zip(_steps(fused, 60), _steps(layered, 60), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_an_engine_on_bfloat16_weights_decodes_the_float32_tokens_of_those_weights(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights that bfloat16 holds exactly: the kernels in bfloat16 and torch in float32 (both
    with a bfloat16 KV pool) decode the same greedy tokens, batched and sharing prefixes; every
    slot has one owner afterwards."""
    path = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config, weights = load_model_files(str(path))
    from safetensors.torch import save_file

    save_file(_rounded(weights), str(path / "model.safetensors"))
    ids = torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    prompts = [ids, ids[:7], ids[5:18]]
    outputs = {}
    for name, dtype, kernels in (("torch", "float32", "0"), ("kernels", "bfloat16", "1")):
        monkeypatch.setenv("RADIXLM_CPU_KERNELS", kernels)
        with Engine(
            str(path), max_total_tokens=512, dtype=dtype, kv_cache_dtype="bfloat16", random_seed=0
        ) as engine:
            assert engine.info.kernel_backend == ("torch" if kernels == "0" else "cpu-kernels")
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            outputs[name] = [o["output_ids"] for o in outs]
            engine.check_invariant()
    assert outputs["kernels"] == outputs["torch"]


def test_the_bfloat16_gemm_is_logged_and_says_where_it_is_slower(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 weights take the BF16 rule whatever RADIXLM_GEMM asks of float32 ones (a
    warning says so), and a CPU without native bfloat16 is told it is slower there."""
    monkeypatch.setenv("RADIXLM_GEMM", "mkl")
    config, weights = load_model_files(str(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="radixlm.kernels.cpu"):
        runner = ModelRunner(config, weights, CPU, BF, 64)
    assert isinstance(runner.backend, CpuKernelBackend)
    rule = bf16_rule(native_bf16())
    assert runner.backend.blas is not None
    described = f"{rule.describe()}; sgemm: {runner.backend.blas.name}"
    assert runner.backend.gemm == described
    messages = [r.getMessage() for r in caplog.records]
    assert f"GEMM: {described}" in messages
    assert any("RADIXLM_GEMM=mkl applies to float32 weights" in m for m in messages)
    assert any("without native bfloat16" in m for m in messages) == (not native_bf16())
