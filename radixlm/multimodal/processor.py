"""Image preprocessing as a model folder's preprocessor_config.json says (CLIPImageProcessor
and SiglipImageProcessor semantics), with Pillow and numpy only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from radixlm.core.images import PAD_RANGE, ImageSpec
from radixlm.models.config import ModelConfig
from radixlm.tokenizer import Tokenizer

# What transformers' processors use when the config leaves a step's parameters out (CLIP's).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image: Image.Image, cfg: dict[str, Any], image_size: int) -> np.ndarray:
    """The model's input for one image: float32 [3, H, W] after RGB conversion, resizing (the
    shortest edge, or to height x width), center crop, rescaling and normalisation."""
    if cfg.get("do_convert_rgb", True) and image.mode != "RGB":
        # As transformers does: transparent pixels become white, not black.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    if cfg.get("do_resize", True):
        size = cfg.get("size") or {"shortest_edge": image_size}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        width, height = image.size
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            new_w, new_h = (edge, new_long) if width <= height else (new_long, edge)
        else:
            new_w, new_h = int(size["width"]), int(size["height"])
        resample = Image.Resampling(cfg.get("resample", Image.Resampling.BICUBIC))
        image = image.resize((new_w, new_h), resample=resample, reducing_gap=None)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = np.moveaxis(pixels, -1, 0)  # channels first
    if cfg.get("do_center_crop", False):
        crop = cfg.get("crop_size") or {"height": image_size, "width": image_size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        pixels = _center_crop(pixels, int(crop["height"]), int(crop["width"]))
    out = pixels.astype(np.float32)
    if cfg.get("do_rescale", True):
        out = (pixels.astype(np.float64) * cfg.get("rescale_factor", 1 / 255)).astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.asarray(cfg.get("image_mean", _CLIP_MEAN), dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.get("image_std", _CLIP_STD), dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: the middle height x width, zero-padded where the image is
    smaller."""
    _, h, w = pixels.shape
    if h < height or w < width:
        padded = np.zeros((pixels.shape[0], max(h, height), max(w, width)), pixels.dtype)
        top, left = -(-(padded.shape[1] - h) // 2), -(-(padded.shape[2] - w) // 2)
        padded[:, top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[1], padded.shape[2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top : top + height, left : left + width]


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-256 of the preprocessed pixels and their shape."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def pad_value(spec: ImageSpec, digest: str) -> int:
    """The token id every position of the image holds: past the vocabulary, from the digest."""
    return spec.pad_base + int(digest[:16], 16) % PAD_RANGE


def image_spec(folder: Path, config: ModelConfig, tokenizer: Tokenizer) -> ImageSpec | None:
    """How the model in `folder` takes images (None for a text-only model): its image token,
    positions per image, and preprocessor_config.json (CLIP's defaults where it is absent)."""
    vision = config.vision
    if vision is None:
        return None
    file = folder / "preprocessor_config.json"
    processor = json.loads(file.read_text()) if file.is_file() else {}
    return ImageSpec(
        token_id=vision.image_token_id,
        token_text=tokenizer.token_text(vision.image_token_id),
        num_tokens=vision.tokens_per_image,
        pad_base=config.vocab_size,
        image_size=vision.image_size,
        processor=processor,
    )
