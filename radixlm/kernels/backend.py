"""The kernel backend: the ops a model calls (norm, rotary + KV write, SwiGLU, short-row
attention, the decode pass, the LM head's GEMM), in one implementation chosen once, when the
runner starts: the compiled CPU kernels or torch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import torch

from radixlm.core.forward import ExtendSeq, KernelExtendLayout, RowLayout
from radixlm.kernels.build import load_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.decode import DecodePass, DecodeShape
from radixlm.kernels.gemm import forced_gemm
from radixlm.kernels.torch_backend import TorchBackend


class Backend(Protocol):
    """A model's ops, over activations of the model's device and dtype and the KV pool; the
    short rows' metadata (`row_layout`) is the backend's own, read only by its ops."""

    @property
    def name(self) -> str:
        """A short name for logs and reports."""
        ...

    @property
    def max_row_queries(self) -> int:
        """The most new tokens a sequence may have to attend as a short row (`row_layout`,
        `row_attention`, the decode pass); longer ones are extends."""
        ...

    def covers(self, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether every op runs here for a model of `dtype` and a pool of `kv_dtype`."""
        ...

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings x in the dtype the backend's ops take activations in (the residual
        stream's: the model's dtype, or float32 for a bfloat16 model's compiled kernels)."""
        ...

    def row_layout(
        self, kv: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, window: int | None
    ) -> RowLayout:
        """The short rows' attention metadata: kv [B, N] each row's slots (padded with slot 0),
        starts [B] its first new position, lens [B] its number of new tokens; `window` the
        model's sliding window (a query sees itself and the window - 1 keys before it), if any."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps) over the last dim; a new tensor."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x in place (residual contiguous, of x's shape), then its norm:
        (norm, residual)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up for gate_up [T, 2I] (gate first): [T, I]."""
        ...

    def rope_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, D] and k [T, KVH, D] by their positions' cos / signed sin
        ([T, 1, D]) and write this step's K/V at `slots` of the head-major caches [KVH, S, D].
        Returns q [T, H, D] and the head-major k, v [KVH, T, D]."""
        ...

    def row_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: RowLayout,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Fill out [T, H, D] (contiguous) with each short row's causal attention over its
        slots of the head-major caches; q [T, H, D] holds the rows' queries, row by row."""
        ...

    def extend_layout(
        self, extends: list[ExtendSeq], window: int | None
    ) -> KernelExtendLayout | None:
        """The extends (all of a batch's, in order) in the layout of this backend's extend
        attention, built once a batch; None where it has none for them (torch's fused
        attention then takes each extend)."""
        ...

    def extend_attention(
        self,
        q: torch.Tensor,
        kh: torch.Tensor,
        vh: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        layout: KernelExtendLayout,
        scale: float,
        out: torch.Tensor,
    ) -> bool:
        """Fill out [T, H, D] (contiguous) with each extend's causal attention (its rows of q
        [T, H, D]): over this step's kh/vh [KVH, T, D] where it has no cached prefix, else over
        its slots of the head-major caches; False, with out untouched, where the backend has
        no kernel for these (the caller runs torch's)."""
        ...

    @property
    def gemm(self) -> str:
        """The linear layers' GEMM, for logs and /server_info."""
        ...

    def prepare(self, weights: Sequence[torch.Tensor]) -> None:
        """Choose the GEMM for the model's linear weights and prepare them (once they are
        final: loaded, and sharded where they are); `linear` then runs them as chosen."""
        ...

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.linear(x, weight, bias) for x [rows, k]."""
        ...

    def decode_pass(
        self,
        layers: Sequence[dict[str, torch.Tensor | None]],
        shape: DecodeShape,
    ) -> DecodePass | None:
        """Every decoder layer of a model over a batch of short rows in one call, built once
        from the model's weights (`DecodePass.names` per layer); None where the backend has no
        such pass (the layers then run one by one)."""
        ...


def choose_backend(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> Backend:
    """The compiled CPU kernels where they cover the device and dtypes and can be built, unless
    `RADIXLM_CPU_KERNELS=0` is set in the environment; else torch. The kernels are built here,
    once per machine, before any request waits on them. `RADIXLM_GEMM` forces the kernels'
    GEMM (`forced_gemm`)."""
    wanted = os.environ.get("RADIXLM_CPU_KERNELS", "1") != "0"
    if wanted and CpuKernelBackend.covers(device, dtype, kv_dtype):
        lib = load_kernels()
        if lib is not None:
            return CpuKernelBackend(lib, forced_gemm())
    return TorchBackend()
