"""Model hyper-parameters, read from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder; one class covers every supported architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    # Mistral: a token attends to itself and the sliding_window - 1 tokens before it; None: to
    # every token before it.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json."""
        model_type = cfg.get("model_type", "llama")
        arch = model_type if model_type in SUPPORTED_ARCHITECTURES else "llama"
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES and not any(
            a.startswith(("Llama", "Mistral", "Qwen2", "Qwen3")) for a in archs
        ):
            raise ValueError(f"unsupported model_type {model_type!r}")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        max_positions = cfg.get("max_position_embeddings", 4096)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=max_positions,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(cfg, arch, max_positions),
        )


def _sliding_window(cfg: dict[str, Any], arch: str, max_positions: int) -> int | None:
    """The attention window of every layer, as transformers reads the config; None where no
    position within the context is ever out of it. A window on some layers only is refused."""
    layers = cfg["num_hidden_layers"]
    if arch == "mistral":
        first = 0
    elif arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        # On the layers from max_window_layers on (28: transformers' default).
        first = cfg.get("max_window_layers", 28)
    else:
        return None
    first = min(first, layers)
    kinds = cfg.get("layer_types") or (
        ["full_attention"] * first + ["sliding_attention"] * (layers - first)
    )
    window = cfg.get("sliding_window")
    if window is None or window >= max_positions or "sliding_attention" not in kinds:
        return None
    if "full_attention" in kinds:
        raise ValueError(
            f"a sliding window (of {window} tokens) on some layers only is not supported"
        )
    return int(window)
