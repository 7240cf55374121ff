"""The compiled CPU kernels as a backend: the ops of a model with float32 or bfloat16 weights,
each one call into the library built by `radixlm.kernels.build`, with a KV pool of float32 or
bfloat16; the activations between ops are float32."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from radixlm.core.forward import (
    ExtendSeq,
    KernelExtendLayout,
    KernelExtends,
    KernelRowLayout,
    RowLayout,
)
from radixlm.kernels.build import SUFFIX, blas_sgemm, native_bf16
from radixlm.kernels.decode import STREAM_ROWS, DecodePass, DecodeShape
from radixlm.kernels.gemm import (
    FEW_ROWS,
    Gemm,
    GemmChoice,
    bf16_rule,
    choose_gemm,
    fixed_rule,
    onednn_available,
    onednn_linear,
    onednn_pack,
)

logger = logging.getLogger(__name__)

# Keys per block of the row attention's online softmax (kBlock in row_attention.h).
ROW_KEY_BLOCK = 64

# The largest head the decode pass takes: its rotary + KV write rotates each key in a buffer of
# this many floats on the stack (rope_store_token in layer_ops.h).
_MAX_PASS_HEAD_DIM = 512


class CpuKernelBackend:
    """The ops of a model with float32 or bfloat16 weights on the CPU, over one compiled library
    (`load_kernels()`, or a variant build such as `load_kernels(("-mno-avx512f",))`); torch's
    thread count is used. Activations are float32 whatever the weights (`activations`): the
    kernels widen bfloat16 weights as they read them, or multiply them with AVX512-BF16's dot
    products (`native_bf16_dot`), and accumulate in float32.

    `blas` names the BLAS whose single-threaded `sgemm` the kernels call on each thread's
    share of a GEMM over more than 64 rows (`build.BLAS`; by default OpenBLAS where installed,
    else MKL: `build.blas_sgemm`). `gemm` is the float32 linear layers' GEMM: "fixed"
    (`gemm.fixed_rule`: streamed up to 64 rows; beyond, that per-thread `sgemm` when it is
    OpenBLAS, else MKL's `F.linear`), "auto" times the candidates on the model's shapes when
    `prepare` is given its weights (see `radixlm.kernels.gemm`), or one of `GEMMS` for every
    row count. bfloat16 weights take `bf16_rule` (`gemm.bf16_rule` for this CPU) whatever
    `gemm` says."""

    name = "cpu-kernels"
    # The row attention kernel starts a row's first block of keys (ROW_KEY_BLOCK, kBlock in
    # row_attention.h) at its first query's first visible key: every query of a row of at most
    # that many sees a key of it. Extends of 17-64 tokens (a short turn, a tool's answer) run
    # 1.2-1.5x faster as rows than as extends (docs/benchmarks.md).
    max_row_queries = ROW_KEY_BLOCK

    def __init__(self, lib: ctypes.CDLL, gemm: str = "fixed", blas: str | None = None) -> None:
        self.lib = lib
        self.blas = blas_sgemm(blas)
        # None without a BLAS: no decode pass, no streamed GEMMs
        self.sgemm = None if self.blas is None else self.blas.address
        self._fixed = fixed_rule(None if self.blas is None else self.blas.name)
        self._forced_gemm = gemm
        if gemm not in ("auto", "fixed") and gemm not in self.gemm_candidates():
            raise ValueError(f"GEMM {gemm!r} is not available here")
        # Until `prepare`: the weight streamed for a few rows, the decode pass's GEMM up to 64.
        self.gemm_choice = GemmChoice.forced(gemm) if gemm not in ("auto", "fixed") else self._fixed
        self.bf16_rule = bf16_rule(native_bf16())
        # id(weight) -> (weight, its version when prepared, its oneDNN copy if oneDNN won)
        self._prepared: dict[int, tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        self._row_attention = {
            dtype: getattr(lib, f"radixlm_row_attention_{suffix}")
            for dtype, suffix in SUFFIX.items()
        }
        self._extend_attention = {
            dtype: getattr(lib, f"radixlm_extend_attention_{suffix}")
            for dtype, suffix in SUFFIX.items()
        }
        self._rope_store = {
            dtype: getattr(lib, f"radixlm_rope_store_{suffix}") for dtype, suffix in SUFFIX.items()
        }
        self._rms_norm_kernel = {
            dtype: getattr(lib, f"radixlm_rms_norm_{suffix}") for dtype, suffix in SUFFIX.items()
        }
        self._linear = {
            dtype: getattr(lib, f"radixlm_linear_{suffix}") for dtype, suffix in SUFFIX.items()
        }

    @property
    def native_bf16_dot(self) -> bool:
        """Whether this build multiplies bfloat16 weights natively (AVX512-BF16's dot products,
        the activations rounded to bfloat16 as torch's bfloat16 GEMMs round them; twice the
        widened path's speed from a few rows up) rather than widening them to float32."""
        return bool(self.lib.radixlm_native_bf16_dot())

    def fma_peak(self, iters: int = 10_000_000) -> float:
        """GFLOP/s of float32 vector FMAs on every thread with nothing but registers: the ceiling
        benchmarks set a GEMM's speed against (0 where this build has no vector path)."""
        return float(self.lib.radixlm_fma_peak(torch.get_num_threads(), iters))

    @staticmethod
    def covers(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether every op runs here for a model of `dtype` and a pool of `kv_dtype`."""
        return device.type == "cpu" and dtype in SUFFIX and kv_dtype in SUFFIX

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream in float32 (the embeddings of a bfloat16 model are widened)."""
        return x.float()

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
        assert weight.is_contiguous() and x.dtype == torch.float32
        dim = x.shape[-1]
        rows = x.reshape(-1, dim)  # a view when the rows are evenly strided
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if residual is not None:
            assert residual.shape == x.shape and residual.is_contiguous()
            assert residual.dtype == x.dtype and residual.device.type == "cpu"
        out = torch.empty(x.shape, dtype=x.dtype)
        self._rms_norm_kernel[weight.dtype](
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

    def extend_layout(
        self, extends: list[ExtendSeq], window: int | None
    ) -> KernelExtendLayout | None:
        """The extends as `extend_attention` reads them; None with a sliding window (torch's
        fused attention takes those) or no extends."""
        if window is not None or not extends:
            return None
        fresh = [(e.q_start, e.q_len, 0, e.q_start) for e in extends if e.prefix_len == 0]
        rows, slots, offset = [], [], 0
        for e in extends:
            if e.prefix_len > 0:
                rows.append((e.q_start, e.q_len, e.prefix_len, offset))
                slots.append(e.kv_slots)
                offset += len(e.kv_slots)
        num_tokens = extends[-1].q_start + extends[-1].q_len
        return KernelExtendLayout(
            fresh=KernelExtends(torch.tensor(fresh), torch.arange(num_tokens)) if fresh else None,
            cached=KernelExtends(torch.tensor(rows), torch.cat(slots)) if rows else None,
        )

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
        """Fill out [T, H, D] (contiguous) with each extend's causal attention, in one parallel
        region per group of `layout`: the kernel's flash attention, the K/V read through the
        extends' slots and a cached prefix they share gathered once (1.1-2x torch's fused
        attention on this machine's shapes: docs/benchmarks.md). q [T, H, D], this step's
        kh/vh [KVH, T, D] (float32), the head-major pool [KVH, S, D]. False, with out untouched,
        for a head size other than 64 or 128."""
        t, h, d = q.shape
        if d not in (64, 128):
            return False
        q = q.contiguous()
        assert out.is_contiguous() and q.dtype == kh.dtype == vh.dtype == out.dtype == torch.float32
        assert kh.is_contiguous() and vh.is_contiguous() and k_cache.is_contiguous()
        for group, k, v in ((layout.fresh, kh, vh), (layout.cached, k_cache, v_cache)):
            if group is None:
                continue
            done = self._extend_attention[k.dtype](
                q.data_ptr(),
                k.data_ptr(),
                v.data_ptr(),
                k.stride(0),
                group.slots.data_ptr(),
                group.seqs.data_ptr(),
                group.seqs.shape[0],
                h,
                k.shape[0],
                d,
                scale,
                out.data_ptr(),
                torch.get_num_threads(),
            )
            assert done == 0
        return True

    @property
    def gemm(self) -> str:
        """The linear layers' GEMM by row count, how it was chosen, and the kernels' BLAS."""
        blas = "none" if self.blas is None else self.blas.name
        return f"{self.gemm_choice.describe()}; sgemm: {blas}"

    def gemm_candidates(self) -> dict[str, Callable[[torch.Tensor], Gemm]]:
        """The GEMMs this build and this torch can run: name -> (weight -> its GEMM)."""
        candidates: dict[str, Callable[[torch.Tensor], Gemm]] = {
            "mkl": lambda w: lambda x: F.linear(x, w)
        }
        if self.sgemm is not None:
            candidates["stream"] = lambda w: lambda x: self.stream_linear(x, w)
        if onednn_available():
            candidates["onednn"] = lambda w: functools.partial(onednn_linear, packed=onednn_pack(w))
        return candidates

    def prepare(self, weights: Sequence[torch.Tensor]) -> None:
        """Choose the GEMM for the shapes of the model's linear weights (timed once per CPU,
        torch, thread count and shapes; see `choose_gemm`) and, where oneDNN wins a range,
        keep a prepacked copy of each weight; bfloat16 weights take `bf16_rule`. Called once the
        weights are final (loaded, and sharded where they are)."""
        if any(w.dtype == torch.bfloat16 for w in weights):
            self.gemm_choice = self._bf16_choice()
        else:
            self.gemm_choice = choose_gemm(
                self.gemm_candidates(),
                [(w.shape[0], w.shape[1]) for w in weights],
                self._forced_gemm,
                fixed=self._fixed,
                blas="" if self.blas is None else self.blas.name,
            )
        packs = self.gemm_choice.packs
        self._prepared = {
            id(w): (w, w._version, onednn_pack(w) if packs else None) for w in weights
        }
        extra = sum(
            w.numel() * w.element_size() for w, _, p in self._prepared.values() if p is not None
        )
        logger.info(
            "GEMM: %s%s%s",
            self.gemm,
            f" [GFLOP/s {self.gemm_choice.figures()}]" if self.gemm_choice.gflops else "",
            f"; oneDNN's prepacked weights take {extra / 2**20:.0f} MiB more" if extra else "",
        )

    def _bf16_choice(self) -> GemmChoice:
        """`bf16_rule`, and a log line where it is slower than it could be or overrides a choice."""
        if self._forced_gemm != "fixed":
            logger.warning(
                "RADIXLM_GEMM=%s applies to float32 weights; bfloat16 weights take %s",
                self._forced_gemm,
                self.bf16_rule.describe(),
            )
        logger.info(
            "bfloat16 weights: %s",
            "native dot products (avx512_bf16) up to 64 rows"
            if self.native_bf16_dot
            else "widened to float32 in registers up to 64 rows",
        )
        if self.bf16_rule.prefill == "widen":
            logger.warning(
                "bfloat16 weights on a CPU without native bfloat16 (avx512_bf16 / AMX): "
                "prefill GEMMs widen each weight to float32 for the call, no faster than "
                "float32 weights here; decodes read half the bytes"
            )
        return self.bf16_rule

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.linear(x, weight, bias) for x [rows, k] (float32 where the weight is bfloat16), by
        the GEMM chosen for its row count. A float32 weight `prepare` did not see (the LM head,
        whose shape was not timed) streams up to STREAM_ROWS rows (once at memory speed, each
        thread its share of the output columns, where BLAS runs far below it) and goes to torch
        beyond; a bfloat16 one follows `bf16_rule`."""
        rows = x.shape[0]
        entry = self._prepared.get(id(weight))
        if entry is not None and entry[0] is weight:
            gemm = self.gemm_choice.for_rows(rows) if rows else "mkl"
        elif weight.dtype == torch.bfloat16:
            gemm = self.bf16_rule.for_rows(rows) if rows else self.bf16_rule.prefill
        else:
            gemm = "stream" if 0 < rows <= STREAM_ROWS else "mkl"
        if gemm == "onednn":
            assert entry is not None
            _, version, packed = entry
            if packed is not None and version == weight._version:
                return onednn_linear(x, packed, bias)
            gemm = "mkl"  # changed in place since: its packed copy is stale
        if gemm == "stream" and (self.sgemm is not None or weight.dtype == torch.bfloat16):
            y = self.stream_linear(x, weight)
            return y if bias is None else y.add_(bias)
        if gemm == "widen":  # bfloat16 weights on a CPU without native bfloat16: float32's
            widened, bias = weight.float(), None if bias is None else bias.float()
            if self._fixed.prefill == "stream":  # the kernels' per-thread OpenBLAS
                y = self.stream_linear(x, widened)
                return y if bias is None else y.add_(bias)
            return F.linear(x, widened, bias)
        if weight.dtype != x.dtype:  # bfloat16 weights: torch's bfloat16 GEMM (oneDNN)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return F.linear(x, weight, bias)

    def _pass_takes(self, tokens: int) -> bool:
        """Whether the decode pass runs a batch of this many short-row tokens: up to
        FEW_ROWS always (its streamed GEMMs and one parallel region a step made such steps
        1.7-1.8x faster than the layers one by one, docs/benchmarks.md, more than a GEMM
        timed alone could win back), beyond that where its own GEMM won that row count."""
        return tokens <= FEW_ROWS or self.gemm_choice.for_rows(tokens) == "stream"

    def stream_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight) for x [rows, k] float32 as the decode pass computes its GEMMs:
        each thread its share of the output columns; up to STREAM_ROWS rows stream the weight,
        more call MKL's sgemm (float32 weights; needs MKL) or stream too (bfloat16 weights)."""
        assert weight.is_contiguous() and x.dim() == 2 and x.dtype == torch.float32
        assert self.sgemm is not None or weight.dtype == torch.bfloat16
        n, k = weight.shape
        x = x.contiguous()
        y = torch.empty(x.shape[0], n, dtype=x.dtype)
        self._linear[weight.dtype](
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
        `DecodePass` for `layers`); None for float32 weights without MKL, or for heads over 512.
        It takes the batches `_pass_takes` says."""
        qkv_w = layers[0]["qkv_w"] if layers else None
        wide = qkv_w is None or qkv_w.dtype == torch.float32
        if (self.sgemm is None and wide) or shape.head_dim > _MAX_PASS_HEAD_DIM:
            return None
        return DecodePass(
            self.lib,
            self.sgemm,
            layers,
            shape,
            takes=self._pass_takes,
        )
