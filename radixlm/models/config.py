"""Model hyper-parameters, read from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


@dataclass(frozen=True)
class VisionConfig:
    """A LLaVA-style model's vision side: the tower (CLIP or SigLIP), which of its hidden states
    become image features, and the projector into the language model."""

    tower: str  # clip_vision_model | siglip_vision_model
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    num_channels: int
    feature_layers: tuple[int, ...]  # hidden states (0: the embeddings) concatenated
    select_strategy: str  # "default" drops the class token, "full" keeps every position
    image_token_id: int
    projector_act: str
    projector_bias: bool

    @property
    def num_patches(self) -> int:
        """Patch positions per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """The tower's sequence length: the patches, after a class token on CLIP."""
        return self.num_patches + (self.tower == "clip_vision_model")

    @property
    def tokens_per_image(self) -> int:
        """Language-model positions one image takes."""
        return self.num_positions - (self.select_strategy == "default")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> VisionConfig:
        """Build from a LlavaForConditionalGeneration config.json."""
        v = cfg["vision_config"]
        tower = v.get("model_type", "clip_vision_model")
        if tower not in VISION_TOWERS:
            raise ValueError(f"unsupported vision tower {tower!r}; supported: {VISION_TOWERS}")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        layer = cfg.get("vision_feature_layer", -2)
        default_act = "quick_gelu" if tower == "clip_vision_model" else "gelu_pytorch_tanh"
        out = cls(
            tower=tower,
            hidden_size=v.get("hidden_size", 768),
            intermediate_size=v.get("intermediate_size", 3072),
            num_layers=v.get("num_hidden_layers", 12),
            num_heads=v.get("num_attention_heads", 12),
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 32 if tower == "clip_vision_model" else 16),
            hidden_act=v.get("hidden_act", default_act),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5 if tower == "clip_vision_model" else 1e-6),
            num_channels=v.get("num_channels", 3),
            feature_layers=tuple(layer) if isinstance(layer, list) else (layer,),
            select_strategy=strategy,
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
            projector_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=cfg.get("multimodal_projector_bias", True),
        )
        seq = cfg.get("image_seq_length")
        if seq is not None and seq != out.tokens_per_image:
            raise ValueError(
                f"image_seq_length is {seq}, but the vision tower gives {out.tokens_per_image} "
                "tokens per image"
            )
        return out


_LLAMA_DEFAULTS = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
}


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
    vision: VisionConfig | None = None  # LLaVA-style models: the vision tower and projector

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
        if cfg.get("model_type") == "llava" or "LlavaForConditionalGeneration" in (
            cfg.get("architectures") or []
        ):
            # Older folders store the text config as a diff against LlamaConfig's defaults.
            text = {**_LLAMA_DEFAULTS, **cfg["text_config"]}
            for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
                if key in cfg and key not in text:
                    text[key] = cfg[key]
            return replace(cls.from_hf(text), vision=VisionConfig.from_hf(cfg))
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
