"""Building blocks shared by every Llama-family model: norm, rotary embedding, paged attention;
the ops inside them are the kernel backend's."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.core.forward import ExtendSeq, ForwardBatch
from radixlm.kernels.backend import Backend
from radixlm.models.rope import rope_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square norm (in float32, like the reference implementation)."""

    def __init__(self, dim: int, eps: float, backend: Backend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's next value, residual + x, and its norm: (norm, sum). The
        residual (contiguous) is updated in place."""
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)


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


# Queries per attention call on a cached prefix: bounds the causal mask at [512, keys].
_Q_BLOCK = 512
# torch's fused attention on the CPU, which also returns each query's log-sum-exp (None where
# this torch has no such op).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# The extends over a cached prefix that take `_prefix_then_own` on the CPU: at least this many
# queries and keys. Timed on Zen 3 (2 threads, 9 / 3 heads of 64): 1.16-1.31x the masked calls
# there, 0.86-1.04x below (its second call and the merge cost what the mask does).
_SPLIT_QUERIES, _SPLIT_KEYS = 256, 2048


def paged_attention(
    q: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    backend: Backend,
) -> torch.Tensor:
    """Attend each token over its request's slots, this step's K/V already in the pool.

    q [T, H, D]; kh/vh [KVH, T, D] are this step's K/V (what a prefill without a cached prefix
    attends over); the caches are head-major [KVH, num_slots + 1, D]. The extends attend
    together in the backend's extend attention where it takes them (`batch.extend_layout`),
    else one by one in torch's fused attention; the short rows together in the backend's row
    attention. With a sliding window (`batch.window`) each token sees only the keys within it.
    Returns [T, H, D].
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, for the kernels
    layout = batch.extend_layout
    if layout is None or not backend.extend_attention(
        q, kh, vh, k_cache, v_cache, layout, scale, out
    ):
        for seq in batch.extends:
            lo, hi = seq.q_start, seq.q_start + seq.q_len
            out[lo:hi] = _torch_extend(
                q[lo:hi], kh[:, lo:hi], vh[:, lo:hi], k_cache, v_cache, seq, scale, batch.window
            )
    if batch.rows is not None:
        start = batch.num_extend_tokens
        backend.row_attention(q[start:], k_cache, v_cache, batch.rows, scale, out[start:])
    return out


def _torch_extend(
    q: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq: ExtendSeq,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One extend's attention in torch's fused attention: over its own K/V kh/vh [KVH, T, D]
    where it has no cached prefix, else over its slots of the caches (gathered)."""
    if seq.prefix_len == 0:
        return extend_attention(q, kh, vh, 0, scale, window)
    # The prefix's keys that some query's window still reaches.
    first = 0 if window is None else max(0, seq.prefix_len + 1 - window)
    slots = seq.kv_slots[first:]
    ks = k_cache.index_select(1, slots).to(q.dtype)
    vs = v_cache.index_select(1, slots).to(q.dtype)
    return extend_attention(q, ks, vs, seq.prefix_len - first, scale, window)


def _prefix_then_own(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """extend_attention without a window on the CPU, in two fused calls and no mask: every
    query over the cached prefix's keys (each KV head's query heads stacked into one sequence,
    so no K/V is repeated), then causally over the extend's own keys; the two are merged by
    their log-sum-exps. A mask would cost the fused attention a third more time than the
    same keys without one (docs/benchmarks.md)."""
    assert _FLASH_CPU is not None
    t, h, d = q.shape
    kvh = k.shape[0]
    g = h // kvh
    # Query head i * g + j reads KV head i: [KVH, g * T, D], head by head.
    stacked = q.reshape(t, kvh, g, d).permute(1, 2, 0, 3).reshape(1, kvh, g * t, d)
    prefix = k[:, :prefix_len].unsqueeze(0), v[:, :prefix_len].unsqueeze(0)
    o1, lse1 = _FLASH_CPU(stacked, *prefix, scale=scale)
    o1 = o1.reshape(kvh, g, t, d).permute(2, 0, 1, 3).reshape(t, h, d)
    lse1 = lse1.reshape(kvh, g, t).permute(2, 0, 1).reshape(t, h)
    own_k = k[:, prefix_len:].repeat_interleave(g, 0).unsqueeze(0)
    own_v = v[:, prefix_len:].repeat_interleave(g, 0).unsqueeze(0)
    o2, lse2 = _FLASH_CPU(q.transpose(0, 1).unsqueeze(0), own_k, own_v, is_causal=True, scale=scale)
    o2, lse2 = o2[0].transpose(0, 1), lse2[0].transpose(0, 1)  # [T, H, D], [T, H]
    top = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - top).exp(), (lse2 - top).exp()
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(q.dtype)


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] (positions prefix_len..) over k/v [KVH, prefix_len + T, D];
    with a sliding `window`, a query sees itself and the window - 1 keys before it only.

    torch's fused attention (flash attention on the CPU too) with grouped-query heads; after a
    cached prefix the causal diagonal is offset (and a window adds a second one), so a mask
    carries it, query block by block; on the CPU a long extend without a window over a long
    prefix takes `_prefix_then_own` instead, without a mask.
    """
    t = q.shape[0]
    if window is not None and prefix_len + t <= window:
        window = None  # no key is ever out of a query's window
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if prefix_len == 0 and window is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)
    split = t >= _SPLIT_QUERIES and prefix_len + t >= _SPLIT_KEYS
    if split and window is None and q.device.type == "cpu" and _FLASH_CPU is not None:
        return _prefix_then_own(q, k, v, prefix_len, scale)
    out = torch.empty_like(q)
    for s in range(0, t, _Q_BLOCK):
        e = min(s + _Q_BLOCK, t)
        # Query s + i sits at position p = prefix_len + s + i and sees keys up to p, and with a
        # window only from p - window + 1: the block's keys run from the first query's first.
        lo = 0 if window is None else max(0, prefix_len + s + 1 - window)
        hi = prefix_len + e
        mask = torch.ones(e - s, hi - lo, dtype=torch.bool, device=q.device)
        mask = mask.tril(prefix_len + s - lo)
        if window is not None:
            mask = mask.triu(prefix_len + s - lo + 1 - window)
        o = F.scaled_dot_product_attention(
            qh[:, :, s:e],
            kh[:, :, lo:hi],
            vh[:, :, lo:hi],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out
