"""The compiled CPU kernels as a backend: a float32 model's ops, each one call into the library
built by `radixlm.kernels.build`, with a KV pool of float32 or bfloat16."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from radixlm.core.forward import KernelRowLayout, RowLayout
from radixlm.kernels.build import KV_SUFFIX, mkl_sgemm
from radixlm.kernels.decode import STREAM_ROWS, DecodePass, DecodeShape

# The largest head the decode pass takes: its rotary + KV write rotates each key in a buffer of
# this many floats on the stack (rope_store_token in layer_ops.h).
_MAX_PASS_HEAD_DIM = 512


class CpuKernelBackend:
    """The ops of a float32 model on the CPU, over one compiled library (`load_kernels()`, or a
    variant build such as `load_kernels(("-mno-avx512f",))`); torch's thread count is used."""

    name = "cpu-kernels"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.sgemm = mkl_sgemm()  # None without MKL: no decode pass, no streamed GEMMs
        self._row_attention = {
            dtype: getattr(lib, f"radixlm_row_attention_{suffix}")
            for dtype, suffix in KV_SUFFIX.items()
        }
        self._rope_store = {
            dtype: getattr(lib, f"radixlm_rope_store_{suffix}")
            for dtype, suffix in KV_SUFFIX.items()
        }

    @staticmethod
    def covers(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether every op runs here for a model of `dtype` and a pool of `kv_dtype`."""
        return device.type == "cpu" and dtype == torch.float32 and kv_dtype in KV_SUFFIX

    def row_layout(
        self, kv: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, window: int | None
    ) -> RowLayout:
        """The short rows as `row_attention` reads them: kv [B, N] each row's slots (padded),
        starts [B] its first new position, lens [B] its number of new tokens; `window` the
        model's sliding window, if any."""
        first = torch.cumsum(lens, 0) - lens
        return KernelRowLayout(kv, torch.stack([first, lens, starts + lens]), window or 0)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps) over the last dim, in one pass; a new tensor."""
        return self._rms_norm(x, weight, eps, None)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x (in place; residual contiguous, of x's shape), then its norm, in one
        pass: (norm, residual)."""
        return self._rms_norm(x, weight, eps, residual), residual

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor:
        assert weight.is_contiguous()
        dim = x.shape[-1]
        rows = x.reshape(-1, dim)  # a view when the rows are evenly strided
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if residual is not None:
            assert residual.shape == x.shape and residual.is_contiguous()
            assert residual.dtype == x.dtype and residual.device.type == "cpu"
        out = torch.empty(x.shape, dtype=x.dtype)
        self.lib.radixlm_rms_norm_f32(
            rows.data_ptr(),
            rows.stride(0),
            None if residual is None else residual.data_ptr(),
            weight.data_ptr(),
            eps,
            out.data_ptr(),
            rows.shape[0],
            dim,
            torch.get_num_threads(),
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up for gate_up [T, 2I] (gate first), in one pass: [T, I]."""
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype)
        self.lib.radixlm_silu_mul_f32(
            gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads()
        )
        return out

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
        """The rotary embedding of q [T, H, D] and k [T, KVH, D] (rotate-half; `sin` carries its
        sign; cos/sin [T, 1, D] or [T, D]), and this step's K/V written at `slots` of each head
        of the pool [KVH, S, D], all in one pass. Each token's heads must be contiguous (q, k, v
        may be views into one fused projection). Returns q [T, H, D] and head-major k, v
        [KVH, T, D]."""
        t, h, d = q.shape
        kvh = k.shape[1]
        q, k, v = (
            x if x.stride(2) == 1 and x.stride(1) == d else x.contiguous() for x in (q, k, v)
        )
        cos, sin = cos.reshape(t, d).contiguous(), sin.reshape(t, d).contiguous()
        for x in (cos, sin, slots, k_cache, v_cache):
            assert x.is_contiguous() and x.device.type == "cpu"
        q_out = torch.empty(t, h, d, dtype=q.dtype)
        k_out = torch.empty(kvh, t, d, dtype=q.dtype)
        v_out = torch.empty(kvh, t, d, dtype=q.dtype)
        self._rope_store[k_cache.dtype](
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            t,
            h,
            kvh,
            d,
            q_out.data_ptr(),
            k_out.data_ptr(),
            v_out.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.shape[1] * d,
            torch.get_num_threads(),
        )
        return q_out, k_out, v_out

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
        slots, reading its K/V straight from the head-major caches [KVH, S, D]; q [T, H, D]
        holds the rows' queries, row by row."""
        assert isinstance(rows, KernelRowLayout), "a batch built by another backend"
        q = q.contiguous()
        for t in (k_cache, v_cache, rows.kv, rows.spans, out):
            assert t.is_contiguous() and t.device.type == "cpu"
        _, h, d = q.shape
        kvh, slots, _ = k_cache.shape
        spans = rows.spans.data_ptr()
        step = rows.spans.stride(0) * rows.spans.element_size()
        self._row_attention[k_cache.dtype](
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            rows.kv.data_ptr(),
            rows.kv.shape[1],
            spans,
            spans + step,
            spans + 2 * step,
            rows.kv.shape[0],
            h,
            kvh,
            d,
            slots * d,
            scale,
            rows.window,
            out.data_ptr(),
            torch.get_num_threads(),
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight) for x [rows, k]. Up to STREAM_ROWS rows (k a multiple of 16,
        the widest vector the kernel assumes) stream the weight once at memory speed, each
        thread its share of the output columns, where BLAS runs far below it; others go to
        torch."""
        if self.sgemm is not None and 0 < x.shape[0] <= STREAM_ROWS and weight.shape[1] % 16 == 0:
            return self.stream_linear(x, weight)
        return F.linear(x, weight)

    def stream_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight) for x [rows, k] as the decode pass computes its GEMMs: each
        thread its share of the output columns; up to STREAM_ROWS rows stream the weight, more
        call MKL's sgemm. Needs MKL and k a multiple of 16."""
        assert self.sgemm is not None and weight.is_contiguous() and x.dim() == 2
        n, k = weight.shape
        x = x.contiguous()
        y = torch.empty(x.shape[0], n, dtype=x.dtype)
        self.lib.radixlm_linear_f32(
            x.data_ptr(),
            x.shape[0],
            k,
            weight.data_ptr(),
            n,
            y.data_ptr(),
            self.sgemm,
            torch.get_num_threads(),
        )
        return y

    def decode_pass(
        self,
        layers: Sequence[dict[str, torch.Tensor | None]],
        shape: DecodeShape,
    ) -> DecodePass | None:
        """Every decoder layer of a model over a batch of short rows in one compiled call (see
        `DecodePass` for `layers`); None without MKL or for heads over 512."""
        if self.sgemm is None or shape.head_dim > _MAX_PASS_HEAD_DIM:
            return None
        return DecodePass(self.lib, self.sgemm, layers, shape)
