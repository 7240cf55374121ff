"""Building blocks shared by every Llama-family model: norm, rotary embedding, paged attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.core.forward import ForwardBatch
from radixlm.kernels import cpu
from radixlm.models.rope import rope_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.layer_ops_supported(x, self.weight):
            return cpu.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's next value, residual + x, and its norm: (norm, sum). The
        residual is updated in place (one pass with the norm on the CPU)."""
        if cpu.layer_ops_supported(x, residual, self.weight) and residual.is_contiguous():
            return cpu.rms_norm(x, self.weight, self.eps, residual), residual
        residual += x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(
        self, head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv = torch.tensor(rope_inv_freq(head_dim, theta, scaling))  # on the default device
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
        # sin carries the sign of rotate-half, so applying it needs no negation per layer.
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        cos = torch.cat([freqs.cos(), freqs.cos()], -1).float()
        sin = torch.cat([-freqs.sin(), freqs.sin()], -1).float()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for these positions, shaped [T, 1, D] to broadcast over heads."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by the cos/sin of its positions; the products and the sum are
    rounded separately, as in the reference implementation (no fused multiply-add)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin


# Queries per attention call on a cached prefix: bounds the causal mask at [512, keys].
_Q_BLOCK = 512


def rope_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by their positions' cos/sin and write this step's
    K/V at `slots` of the head-major caches [KVH, num_slots + 1, D]. Returns q and the
    head-major k, v [KVH, T, D]. One compiled pass on the CPU."""
    cos, sin = rope
    if cpu.rope_store_supported(q, k_cache):
        return cpu.rope_store(q, k, v, cos, sin, slots, k_cache, v_cache)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)
    k_cache.index_copy_(1, slots, kh.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, vh.to(v_cache.dtype))
    return q, kh, vh


def paged_attention(
    q: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Attend each token over its request's slots, this step's K/V already in the pool.

    q [T, H, D]; kh/vh [KVH, T, D] are this step's K/V (what a prefill without a cached prefix
    attends over); the caches are head-major [KVH, num_slots + 1, D]. Returns [T, H, D].
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, for the kernel
    for seq in batch.extends:
        lo, hi = seq.q_start, seq.q_start + seq.q_len
        if seq.prefix_len == 0:
            ks, vs = kh[:, lo:hi], vh[:, lo:hi]
        else:
            ks = k_cache.index_select(1, seq.kv_slots).to(q.dtype)
            vs = v_cache.index_select(1, seq.kv_slots).to(q.dtype)
        out[lo:hi] = extend_attention(q[lo:hi], ks, vs, seq.prefix_len, scale)
    if batch.row_kv is not None:
        start = batch.num_extend_tokens
        if batch.row_spans is not None:  # the runner chose the CPU kernel
            rows_q = q[start:].contiguous()
            cpu.row_attention(
                rows_q, k_cache, v_cache, batch.row_kv, batch.row_spans, scale, out[start:]
            )
        else:
            out[start:] = row_attention(q[start:], k_cache, v_cache, batch, scale)
    return out


def extend_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] (positions prefix_len..) over k/v [KVH, prefix_len + T, D].

    torch's fused attention (flash attention on the CPU too) with grouped-query heads; after a
    cached prefix the causal diagonal is offset, so a mask carries it, query block by block.
    """
    t = q.shape[0]
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if prefix_len == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)
    out = torch.empty_like(q)
    for s in range(0, t, _Q_BLOCK):
        e = min(s + _Q_BLOCK, t)
        n_keys = prefix_len + e
        # Query s + i sits at position prefix_len + s + i and sees keys up to there.
        mask = torch.ones(e - s, n_keys, dtype=torch.bool, device=q.device).tril(prefix_len + s)
        o = F.scaled_dot_product_attention(
            qh[:, :, s:e],
            kh[:, :, :n_keys],
            vh[:, :, :n_keys],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out


def row_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """The short rows' queries q [T_rows, H, D], padded to [B, Q], over each row's padded slots;
    batch.row_mask hides padding and each query's future. Decodes are rows with Q = 1."""
    assert batch.row_kv is not None and batch.row_query is not None
    assert batch.row_valid is not None and batch.row_mask is not None
    b, nq = batch.row_query.shape
    n = batch.row_kv.shape[1]
    _, h, d = q.shape
    kvh = k_cache.shape[0]
    g = h // kvh
    flat = batch.row_kv.view(-1)
    # Gathered head-major, [KVH * B, N, D] is one strided batch for bmm: no further copies.
    kd = k_cache.index_select(1, flat).view(kvh * b, n, d)
    vd = v_cache.index_select(1, flat).view(kvh * b, n, d)
    qp = (q * scale).index_select(0, batch.row_query.view(-1)).view(b, nq, kvh, g, d)
    # With a narrower KV dtype the matmuls run in it (that is the point: half the bytes read);
    # the softmax stays in the model's dtype.
    qh = qp.to(kd.dtype).permute(2, 0, 1, 3, 4).reshape(kvh * b, nq * g, d)
    scores = torch.bmm(qh, kd.transpose(1, 2)).view(kvh, b, nq, g, n).to(q.dtype)
    scores.masked_fill_(~batch.row_mask.view(1, b, nq, 1, n), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(vd.dtype).view(kvh * b, nq * g, n)
    out = torch.bmm(probs, vd).view(kvh, b, nq, g, d).permute(1, 2, 0, 3, 4)
    return out.reshape(b, nq, h, d)[batch.row_valid].to(q.dtype)
