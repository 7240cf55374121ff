"""Which backend a runner gets: chosen once from the device, the dtypes and the environment."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from radixlm.kernels.backend import choose_backend
from radixlm.kernels.build import load_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.torch_backend import TorchBackend
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

CPU = torch.device("cpu")
needs_kernels = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler")


@needs_kernels
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_a_float32_model_on_the_cpu_gets_the_kernels(
    kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RADIXLM_CPU_KERNELS", raising=False)
    assert isinstance(choose_backend(CPU, torch.float32, kv_dtype), CpuKernelBackend)


@pytest.mark.parametrize(
    ("device", "dtype", "kv_dtype"),
    [
        ("cpu", torch.float16, torch.float32),  # the kernels read float32 or bfloat16 weights
        ("cpu", torch.float32, torch.float16),  # nor read a float16 pool
        ("cuda", torch.float32, torch.float32),
    ],
)
def test_what_the_kernels_do_not_cover_gets_torch(
    device: str, dtype: torch.dtype, kv_dtype: torch.dtype
) -> None:
    assert isinstance(choose_backend(torch.device(device), dtype, kv_dtype), TorchBackend)


def test_the_environment_can_turn_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXLM_CPU_KERNELS", "0")
    assert isinstance(choose_backend(CPU, torch.float32, torch.float32), TorchBackend)


def test_the_runner_names_and_logs_its_backend(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, weights = load_model_files(str(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="radixlm.runner.runner"):
        runner = ModelRunner(config, weights, CPU, torch.float32, 64)
    expected = choose_backend(CPU, torch.float32, torch.float32).name
    assert runner.backend.name == expected
    assert [r.getMessage() for r in caplog.records] == [f"kernel backend: {expected}"]


@needs_kernels
def test_a_runner_refuses_a_backend_that_does_not_cover_its_dtypes(tiny_model_dir: Path) -> None:
    config, weights = load_model_files(str(tiny_model_dir))
    lib = load_kernels()
    assert lib is not None
    with pytest.raises(ValueError, match="does not cover"):
        ModelRunner(config, weights, CPU, torch.float32, 64, torch.float16, CpuKernelBackend(lib))
