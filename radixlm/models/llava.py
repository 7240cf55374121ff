"""LLaVA-style vision-language model: a vision tower, a projector, a Llama-family LM."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from radixlm.cache.encoder_cache import EncoderCache
from radixlm.core.forward import ForwardBatch
from radixlm.core.images import ImageFill
from radixlm.kernels.backend import Backend
from radixlm.models.config import ModelConfig
from radixlm.models.layers import RotaryEmbedding
from radixlm.models.llama import LlamaForCausalLM
from radixlm.models.vision import Projector, VisionTower, check_image_size, vision_weight_name


class LlavaForConditionalGeneration(nn.Module):
    """The LM over token embeddings where image positions take the projected vision features.

    Image positions hold pad ids past the vocabulary (radixlm.core.images); the batch's
    `images` say which flat tokens take which rows of which image's features. Features come
    from `encoder_cache`, or from one run of the tower over every image missing there."""

    def __init__(self, cfg: ModelConfig, backend: Backend) -> None:
        super().__init__()
        assert cfg.vision is not None, "a LLaVA model has a vision config"
        self.config = cfg
        self.language_model = LlamaForCausalLM(cfg, backend)
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision, cfg.hidden_size)
        self.encoder_cache = EncoderCache()
        self.images_encoded = 0  # images the vision tower has run on

    # The runner builds models on the meta device and then resets these, as for the LM alone.
    @property
    def rope(self) -> RotaryEmbedding:
        """The LM's rotary embedding."""
        return self.language_model.rope

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The LM's token embeddings."""
        return self.language_model.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        """The LM's output projection."""
        return self.language_model.lm_head

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        ids = batch.input_ids
        if batch.images:
            ids = ids.clamp(max=self.config.vocab_size - 1)  # pad ids are overwritten below
        embeds = self.language_model.embed_tokens(ids)
        if batch.images:
            self._fill_images(embeds, batch.images)
        return self.language_model(batch, k_caches, v_caches, embeds=embeds)

    def _fill_images(self, embeds: torch.Tensor, fills: list[ImageFill]) -> None:
        features = self.image_features({f.span.digest: f.span.pixels for f in fills})
        for f in fills:
            rows = features[f.span.digest][f.first : f.first + f.count]
            embeds[f.flat : f.flat + f.count] = rows.to(embeds.dtype)

    def image_features(self, pixels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Projected features [tokens_per_image, hidden] per digest: cached ones as they are,
        the others from one batched run of the tower (then cached)."""
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for digest in pixels:
            found = self.encoder_cache.get(digest)
            if found is None:
                missing.append(digest)
            else:
                out[digest] = found
        if missing:
            weight = self.multi_modal_projector.linear_1.weight
            batch = torch.stack([torch.from_numpy(pixels[d]) for d in missing]).to(
                weight.device, weight.dtype
            )
            assert self.config.vision is not None
            check_image_size(self.config.vision, batch)
            encoded = self.multi_modal_projector(self.vision_tower(batch))
            self.images_encoded += len(missing)
            for digest, feats in zip(missing, encoded, strict=True):
                out[digest] = feats
                self.encoder_cache.put(digest, feats)
        return out

    def _unused_layer(self, name: str) -> bool:
        """Whether name is a tower layer past the deepest one the features read (never run)."""
        pieces = name.split(".")
        return pieces[0] == "layers" and int(pieces[1]) >= len(self.vision_tower.layers)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a LLaVA checkpoint in (either transformers layout); every parameter is set."""
        parts: dict[str, dict[str, torch.Tensor]] = {
            "language_model": {},
            "vision_tower": {},
            "multi_modal_projector": {},
        }
        for hf_name, tensor in weights.items():
            found = vision_weight_name(hf_name)
            if found is not None and not (
                found[0] == "vision_tower" and self._unused_layer(found[1])
            ):
                parts[found[0]][found[1]] = tensor
        self.language_model.load_weights(parts["language_model"])
        for part in ("vision_tower", "multi_modal_projector"):
            module: nn.Module = getattr(self, part)
            params = dict(module.named_parameters())
            missing = set(params) - set(parts[part])
            if missing:
                raise ValueError(f"checkpoint is missing weights: {part}.{sorted(missing)[0]}")
            for name, tensor in parts[part].items():
                LlamaForCausalLM._copy(params, name, tensor)
