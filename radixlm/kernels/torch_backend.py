"""The torch backend: a model's ops in plain torch, for any device and dtype (CUDA, or the CPU
without the compiled kernels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from radixlm.core.forward import ExtendSeq, KernelExtendLayout, RowLayout, TorchRowLayout
from radixlm.core.plan import MAX_ROW_QUERIES
from radixlm.kernels.decode import DecodePass, DecodeShape


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by the cos/sin of its positions; the products and the sum are
    rounded separately, as in the reference implementation (no fused multiply-add)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin


class TorchBackend:
    """The ops in torch: what the compiled CPU kernels compute, op by op."""

    name = "torch"
    max_row_queries = MAX_ROW_QUERIES  # rows are padded to the longest: a few tokens each

    @staticmethod
    def covers(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether every op runs here for a model of `dtype` and a pool of `kv_dtype`: always."""
        return True

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream in the model's dtype, as it is."""
        return x

    def row_layout(
        self, kv: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, window: int | None
    ) -> RowLayout:
        """The short rows padded to [B, Q] queries: kv [B, N] each row's slots (padded), starts
        [B] its first new position, lens [B] its number of new tokens; with a sliding `window`
        a query sees only itself and the window - 1 keys before it."""
        first = torch.cumsum(lens, 0) - lens
        q = torch.arange(int(lens.max()), device=kv.device)
        valid = q[None, :] < lens[:, None]
        # A padded query repeats its row's last one, so its softmax stays finite.
        last = torch.minimum(q[None, :], lens[:, None] - 1)
        visible_to = (starts[:, None] + last)[:, :, None]
        keys = torch.arange(kv.shape[1], device=kv.device)[None, None, :]
        mask = keys <= visible_to
        if window is not None:
            mask &= keys > visible_to - window
        return TorchRowLayout(kv, first[:, None] + last, valid, mask)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in float32 like the
        reference implementation."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x (in place), then its norm: (norm, residual)."""
        residual += x
        return self.rms_norm(residual, weight, eps), residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up for gate_up [T, 2I] (gate first): [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

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
        """Rotate q [T, H, D] and k [T, KVH, D] by their positions' cos/sin ([T, 1, D]) and
        write this step's K/V at `slots` of the head-major caches [KVH, S, D]. Returns q and
        the head-major k, v [KVH, T, D]."""
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kh, vh = k.transpose(0, 1), v.transpose(0, 1)
        k_cache.index_copy_(1, slots, kh.to(k_cache.dtype))
        v_cache.index_copy_(1, slots, vh.to(v_cache.dtype))
        return q, kh, vh

    def row_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: RowLayout,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Fill out [T, H, D] with the short rows' attention: their queries q [T, H, D], padded
        to [B, Q], over each row's padded slots; the mask hides padding and each query's future.
        Decodes are rows with Q = 1."""
        assert isinstance(rows, TorchRowLayout), "a batch built by another backend"
        b, nq = rows.query.shape
        n = rows.kv.shape[1]
        _, h, d = q.shape
        kvh = k_cache.shape[0]
        g = h // kvh
        flat = rows.kv.view(-1)
        # Gathered head-major, [KVH * B, N, D] is one strided batch for bmm: no further copies.
        kd = k_cache.index_select(1, flat).view(kvh * b, n, d)
        vd = v_cache.index_select(1, flat).view(kvh * b, n, d)
        qp = (q * scale).index_select(0, rows.query.view(-1)).view(b, nq, kvh, g, d)
        # With a narrower KV dtype the matmuls run in it (that is the point: half the bytes
        # read); the softmax stays in the model's dtype.
        qh = qp.to(kd.dtype).permute(2, 0, 1, 3, 4).reshape(kvh * b, nq * g, d)
        scores = torch.bmm(qh, kd.transpose(1, 2)).view(kvh, b, nq, g, n).to(q.dtype)
        scores.masked_fill_(~rows.mask.view(1, b, nq, 1, n), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vd.dtype).view(kvh * b, nq * g, n)
        o = torch.bmm(probs, vd).view(kvh, b, nq, g, d).permute(1, 2, 0, 3, 4)
        out.copy_(o.reshape(b, nq, h, d)[rows.valid])

    def extend_layout(
        self, extends: list[ExtendSeq], window: int | None
    ) -> KernelExtendLayout | None:
        """None: torch's fused attention (the caller's) takes each extend."""
        return None

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
        """False: torch's fused attention (the caller's) is this backend's."""
        return False

    gemm = "F.linear"

    def prepare(self, weights: Sequence[torch.Tensor]) -> None:
        """Nothing to choose: every device runs F.linear."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.linear(x, weight, bias)."""
        return F.linear(x, weight, bias)

    def decode_pass(
        self,
        layers: Sequence[dict[str, torch.Tensor | None]],
        shape: DecodeShape,
    ) -> DecodePass | None:
        """None: the layers run one by one."""
        return None
