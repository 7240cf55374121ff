"""Extend attention (prefill chunks, with or without a cached prefix) against dense attention."""

from __future__ import annotations

import pytest
import torch

from radixlm.models import layers
from radixlm.models.layers import extend_attention


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, window: int | None = None
) -> torch.Tensor:
    """Causal attention in float64: query i at position prefix_len + i sees keys up to there
    (with a sliding window, only the last `window` of them)."""
    t, h, d = q.shape
    g = h // k.shape[0]
    kd, vd = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    scores = q.double().transpose(0, 1) @ kd.transpose(1, 2) * d**-0.5  # [H, T, L]
    keys, pos = torch.arange(k.shape[1])[None, :], (prefix_len + torch.arange(t))[:, None]
    hidden = (keys > pos) | ((keys <= pos - window) if window else False)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return (probs @ vd).transpose(0, 1)


@pytest.mark.parametrize("split", [True, False], ids=["prefix-then-own", "masked"])
@pytest.mark.parametrize(
    ("prefix_len", "t", "h", "kvh"),
    [
        (0, 1, 4, 4),
        (0, 300, 9, 3),
        (5, 40, 8, 2),
        (700, 1100, 9, 3),
        (1, 513, 6, 1),
        (1792, 256, 9, 3),  # the smallest extend the CPU splits into prefix and own keys
        (2000, 260, 8, 8),
        (1000, 1100, 4, 1),
    ],
)
def test_extend_attention_equals_dense(
    prefix_len: int, t: int, h: int, kvh: int, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways over a cached prefix (on the CPU, long extends split it from their own keys;
    other devices, and short extends, mask) equal dense attention."""
    if not split:
        monkeypatch.setattr(layers, "_FLASH_CPU", None)
    gen = torch.Generator().manual_seed(prefix_len + t)
    d = 64
    q = torch.randn(t, h, d, generator=gen)
    k = torch.randn(kvh, prefix_len + t, d, generator=gen)
    v = torch.randn(kvh, prefix_len + t, d, generator=gen)
    out = extend_attention(q, k, v, prefix_len, d**-0.5)
    torch.testing.assert_close(out.double(), _dense(q, k, v, prefix_len), atol=2e-5, rtol=1e-4)


def test_a_split_extend_in_bfloat16_stays_bfloat16_and_close() -> None:
    gen = torch.Generator().manual_seed(1)
    t, prefix_len, d = 300, 1800, 64
    q = torch.randn(t, 9, d, generator=gen).bfloat16()
    k = torch.randn(3, prefix_len + t, d, generator=gen).bfloat16()
    v = torch.randn(3, prefix_len + t, d, generator=gen).bfloat16()
    out = extend_attention(q, k, v, prefix_len, d**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.double(), _dense(q, k, v, prefix_len), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("prefix_len", "t", "window"),
    [(0, 300, 16), (0, 40, 40), (0, 41, 40), (5, 40, 1), (700, 1100, 600), (20, 3, 4)],
)
def test_extend_attention_with_a_sliding_window_equals_dense(
    prefix_len: int, t: int, window: int
) -> None:
    gen = torch.Generator().manual_seed(prefix_len + t + window)
    h, kvh, d = 8, 2, 64
    q = torch.randn(t, h, d, generator=gen)
    k = torch.randn(kvh, prefix_len + t, d, generator=gen)
    v = torch.randn(kvh, prefix_len + t, d, generator=gen)
    out = extend_attention(q, k, v, prefix_len, d**-0.5, window)
    want = _dense(q, k, v, prefix_len, window)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
