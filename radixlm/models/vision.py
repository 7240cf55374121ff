"""Vision towers of LLaVA-style models (CLIP and SigLIP encoders) in plain PyTorch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from radixlm.models.config import VisionConfig


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a Hugging Face config names (hidden_act, projector_hidden_act)."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}")
    return table[name]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over an image's patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, h))


class VisionMLP(nn.Module):
    """fc1, activation, fc2."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """A pre-norm transformer encoder layer (LayerNorm with bias)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(h, eps=eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(h, eps=eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    """Patches (a strided convolution) plus learned positions; CLIP puts a class token first."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        clip = cfg.tower == "clip_vision_model"
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels,
            cfg.hidden_size,
            kernel_size=cfg.patch_size,
            stride=cfg.patch_size,
            bias=not clip,
        )
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size)) if clip else None
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight[: x.shape[1]]


class VisionTower(nn.Module):
    """The encoder up to the deepest hidden state the features need (later layers never run)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        n = cfg.num_layers
        self.feature_layers = [i % (n + 1) for i in cfg.feature_layers]  # -2: hidden_states[n-1]
        self.embeddings = VisionEmbeddings(cfg)
        clip = cfg.tower == "clip_vision_model"
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if clip else None
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(max(self.feature_layers)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features [images, positions, hidden * len(feature_layers)], the class token dropped
        under the "default" select strategy (as transformers' LLaVA does)."""
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        start = 1 if self.config.select_strategy == "default" else 0
        return torch.cat([states[i][:, start:] for i in self.feature_layers], dim=-1)


class Projector(nn.Module):
    """The multimodal projector: linear_1, activation, linear_2, into the LM's hidden size."""

    def __init__(self, cfg: VisionConfig, text_hidden: int) -> None:
        super().__init__()
        width = cfg.hidden_size * len(cfg.feature_layers)
        self.act = activation(cfg.projector_act)
        self.linear_1 = nn.Linear(width, text_hidden, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def vision_weight_name(hf_name: str) -> tuple[str, str] | None:
    """(part, name) of a LLaVA checkpoint tensor: part "language_model" (names as
    LlamaForCausalLM.load_weights reads them), "vision_tower" or "multi_modal_projector"; None
    for tensors LLaVA never uses (the final norm, SigLIP's pooling head: the features are
    hidden states before them). Both transformers layouts are read."""
    name = hf_name.removeprefix("model.")
    if name == "lm_head.weight":
        return "language_model", name
    part, _, rest = name.partition(".")
    if part == "language_model":
        return part, rest.removeprefix("model.")
    if part == "vision_tower":
        rest = rest.removeprefix("vision_model.").removeprefix("encoder.")
        return None if rest.startswith(("head.", "post_layernorm.")) else (part, rest)
    if part == "multi_modal_projector":
        return part, rest
    raise ValueError(f"unexpected weight {hf_name!r} in a LLaVA checkpoint")


def check_image_size(cfg: VisionConfig, pixels: torch.Tensor) -> None:
    """ValueError unless pixels is [images, channels, image_size, image_size]."""
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
        raise ValueError(f"pixels of shape {tuple(pixels.shape)}, expected [N, {want}]")
