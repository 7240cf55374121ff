"""The CPU decode pass: every decoder layer over a batch of short rows in one call into the
compiled library (`decode_layers.cpp`), one OpenMP region for the whole forward."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from radixlm.core.forward import KernelRowLayout, RowLayout
from radixlm.kernels.build import SUFFIX

_P, _I64 = ctypes.c_void_p, ctypes.c_int64

# Rows up to which the pass (and `CpuKernelBackend.linear`) stream each weight once instead of
# calling BLAS, every row summed in the same order whatever the batch: kStreamRows in
# decode_layers.cpp.
STREAM_ROWS = 64


class _DecodeArgs(ctypes.Structure):
    """DecodeArgs of decode_layers.cpp, field for field."""

    _fields_ = [
        *((n, _I64) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter")),
        *((n, _P) for n in ("in_norm", "qkv_w", "qkv_b", "q_norm", "k_norm", "o_w")),
        *((n, _P) for n in ("post_norm", "gate_up_w", "down_w", "k_cache", "v_cache")),
        ("head_stride", _I64),
        ("tokens", _I64),
        *((n, _P) for n in ("residual", "out", "cos", "sin", "out_slots", "row_kv")),
        ("row_stride", _I64),
        *((n, _P) for n in ("q_start", "q_len", "kv_len")),
        ("rows", _I64),
        ("window", _I64),
        ("sgemm", _P),
        ("num_threads", _I64),
        ("gemms_only", _I64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of the tensors' data pointers."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


@dataclass(frozen=True, slots=True)
class DecodeShape:
    """The sizes of a model's decoder layers that the decode pass needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int  # the MLP's intermediate size
    eps: float  # RMSNorm's epsilon
    scale: float  # the attention's softmax scale


class DecodePass:
    """Every decoder layer of one model over a batch of short rows (no extends) in one call.

    Built once per model from its weights: per layer, a tensor for each of `names` (`qkv_b`,
    `q_norm` and `k_norm` may be None), all float32 or all bfloat16, contiguous and on the CPU;
    the activations are float32. Each GEMM is split by output columns among the threads, each
    calling `sgemm` (MKL's) on its share or, up to STREAM_ROWS tokens, streaming its weight;
    bfloat16 weights stream for any number of tokens (`sgemm` may then be None). `takes(tokens)`
    says whether a batch of that many tokens should run here rather than layer by layer (where
    another GEMM was measured faster for its row count).
    """

    names = (
        *("in_norm", "qkv_w", "qkv_b", "q_norm", "k_norm"),
        *("o_w", "post_norm", "gate_up_w", "down_w"),
    )

    def __init__(
        self,
        lib: ctypes.CDLL,
        sgemm: int | None,
        layers: Sequence[dict[str, torch.Tensor | None]],
        shape: DecodeShape,
        takes: Callable[[int], bool] = lambda tokens: True,
    ) -> None:
        self.takes = takes
        qkv_w = layers[0]["qkv_w"]
        assert qkv_w is not None and qkv_w.dtype in SUFFIX
        self.dtype = qkv_w.dtype  # every weight's
        self._entry = {
            dtype: getattr(lib, f"radixlm_decode_layers_{SUFFIX[self.dtype]}_{suffix}")
            for dtype, suffix in SUFFIX.items()
        }
        self.tensors = layers  # keeps what the pointers point at alive
        self.args = _DecodeArgs(
            layers=len(layers),
            hidden=shape.hidden,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            inter=shape.inter,
            eps=shape.eps,
            scale=shape.scale,
            sgemm=sgemm,
        )
        self.arrays = []  # alive as long as args points at them
        for layer in layers:
            assert set(layer) == set(self.names), sorted(set(layer) ^ set(self.names))
        for name in self.names:
            column = [layer[name] for layer in layers]
            present = [t for t in column if t is not None]
            for t in present:
                assert t.dtype == self.dtype and t.is_contiguous(), f"{name}: {t.dtype}"
                assert t.device.type == "cpu"
            if len(present) < len(column):
                assert not present, f"{name}: every layer has one, or none"
                continue  # a null array: the model has none
            array = _pointers(present)
            self.arrays.append(array)
            setattr(self.args, name, ctypes.cast(array, ctypes.c_void_p))

    def __call__(
        self,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        out_slots: torch.Tensor,
        rows: RowLayout,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Each token's K/V is written at out_slots of each layer's pool and its rows attend as
        in `CpuKernelBackend.row_attention`. residual [T, hidden] (float32) holds the embeddings
        and is updated in place; returns the last layer's output [T, hidden] (not yet added to the
        residual). cos / sin [T, 1, D] or [T, D]."""
        assert isinstance(rows, KernelRowLayout), "a batch built by another backend"
        return self._run(residual, cos, sin, out_slots, rows, k_caches, v_caches, gemms_only=False)

    def gemms(
        self, residual: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Only the weight GEMMs of a pass over residual's tokens, as the pass runs them (for
        benchmarks): nothing else is computed, nothing is written to residual or the pools."""
        t = residual.shape[0]
        zeros = torch.zeros(t, dtype=torch.int64)
        cos = torch.zeros(t, self.args.head_dim)
        spans = torch.stack([torch.arange(t), zeros + 1, zeros + 1])
        rows = KernelRowLayout(zeros[:, None], spans)
        return self._run(residual, cos, cos, zeros, rows, k_caches, v_caches, gemms_only=True)

    def _run(
        self,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        out_slots: torch.Tensor,
        rows: KernelRowLayout,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        *,
        gemms_only: bool,
    ) -> torch.Tensor:
        t = residual.shape[0]
        cos, sin = cos.reshape(t, -1).contiguous(), sin.reshape(t, -1).contiguous()
        assert residual.dtype == cos.dtype == sin.dtype == torch.float32
        for x in (residual, cos, sin, out_slots, rows.kv, rows.spans, *k_caches, *v_caches):
            assert x.is_contiguous() and x.device.type == "cpu"
        out = torch.empty_like(residual)
        args = _DecodeArgs.from_buffer_copy(self.args)
        k_ptrs, v_ptrs = _pointers(k_caches), _pointers(v_caches)
        spans = rows.spans.data_ptr()
        step = rows.spans.stride(0) * rows.spans.element_size()
        args.k_cache, args.v_cache = ctypes.cast(k_ptrs, _P), ctypes.cast(v_ptrs, _P)
        args.head_stride = k_caches[0].shape[1] * k_caches[0].shape[2]
        args.tokens, args.rows, args.row_stride = t, rows.kv.shape[0], rows.kv.shape[1]
        args.residual, args.out = residual.data_ptr(), out.data_ptr()
        args.cos, args.sin, args.out_slots = cos.data_ptr(), sin.data_ptr(), out_slots.data_ptr()
        args.row_kv = rows.kv.data_ptr()
        args.q_start, args.q_len, args.kv_len = spans, spans + step, spans + 2 * step
        args.window = rows.window
        args.num_threads = torch.get_num_threads()
        args.gemms_only = gemms_only
        self._entry[k_caches[0].dtype](ctypes.byref(args))
        return out
