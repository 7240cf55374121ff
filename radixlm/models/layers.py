"""Building blocks shared by every Llama-family model: norm, rotary embedding, paged attention."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.runner.batch import ForwardBatch


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 or linear scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    assert scaling is not None
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(
        self, head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, D] and k [T, KVH, D] by their token positions."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Write this step's k/v into the pool, then attend each token over its request's slots.

    q [T, H, D], k/v [T, KVH, D]; the caches are [num_slots + 1, KVH, D]. Returns [T, H, D].
    """
    k_cache[batch.out_slots] = k
    v_cache[batch.out_slots] = v
    out = torch.empty_like(q)
    for seq in batch.extends:
        lo, hi = seq.q_start, seq.q_start + seq.q_len
        qs = q[lo:hi].transpose(0, 1)
        if seq.prefix_len == 0:
            ks, vs = k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1)
        else:
            ks = k_cache[seq.kv_slots].transpose(0, 1)
            vs = v_cache[seq.kv_slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=seq.causal_mask,
            is_causal=seq.prefix_len == 0,
            scale=scale,
            enable_gqa=True,
        )
        out[lo:hi] = o.transpose(0, 1)
    if batch.decode_kv is not None:
        start = batch.num_extend_tokens
        qd = q[start:].unsqueeze(2)  # [B, H, 1, D]
        kd = k_cache[batch.decode_kv].transpose(1, 2)  # [B, KVH, L, D]
        vd = v_cache[batch.decode_kv].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=batch.decode_mask, scale=scale, enable_gqa=True
        )
        out[start:] = o.squeeze(2)
    return out
