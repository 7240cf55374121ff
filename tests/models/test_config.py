"""ModelConfig from a Hugging Face config.json: the sliding window, read as transformers reads it."""

from __future__ import annotations

from typing import Any

import pytest

from radixlm.models.config import ModelConfig


def window(arch: str, **overrides: Any) -> int | None:
    """The sliding window read from a 2-layer config.json of `arch`."""
    cfg = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 2048,
        **overrides,
    }
    return ModelConfig.from_hf(cfg).sliding_window


def test_mistral_window() -> None:
    assert window("mistral", sliding_window=4096, max_position_embeddings=32768) == 4096
    assert window("mistral", sliding_window=None) is None  # Mistral v0.2 and later
    # A window no context can exceed never hides a key.
    assert window("mistral", sliding_window=4096, max_position_embeddings=4096) is None


def test_qwen_window_only_with_use_sliding_window() -> None:
    assert window("qwen2", sliding_window=64, use_sliding_window=False) is None
    assert window("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=0) == 64
    # From layer max_window_layers on: none of the 2 layers.
    assert window("qwen3", sliding_window=64, use_sliding_window=True, max_window_layers=2) is None


def test_llama_has_no_window() -> None:
    assert window("llama", sliding_window=64) is None


def test_a_window_on_some_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="sliding window .* on some layers"):
        window("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(ValueError, match="on some layers"):
        window("mistral", sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    assert window("mistral", sliding_window=64, layer_types=["full_attention"] * 2) is None
