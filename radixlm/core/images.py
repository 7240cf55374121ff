"""Images in a prompt: runs of placeholder positions whose token ids come from the pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Pad values are drawn from this many ids past the vocabulary: two different images share a
# radix key (and so K/V) only if 30 bits of their pixels' SHA-256 agree.
PAD_RANGE = 1 << 30


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What the frontend needs to turn a model's images into prompt positions."""

    token_id: int  # the image token in text: each occurrence becomes `num_tokens` positions
    token_text: str
    num_tokens: int  # positions per image (the vision tower's output length)
    pad_base: int  # the vocabulary size: pad values start here and never collide with text
    image_size: int  # the vision tower's input is [3, image_size, image_size]
    # preprocessor_config.json, read by radixlm.multimodal.processor
    processor: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True, slots=True, eq=False)
class ImageSpan:
    """One image of a prompt: positions [offset, offset + length), each holding `pad` as its
    token id, so the radix tree shares the image's K/V exactly when the pixels are the same."""

    offset: int
    length: int
    digest: str  # SHA-256 of the preprocessed pixels: the encoder-output cache's key
    pad: int
    pixels: np.ndarray = field(repr=False)  # float32 [3, H, W], preprocessed

    @property
    def end(self) -> int:
        """One past its last position."""
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ImageFill:
    """Image positions in a forward batch: flat tokens [flat, flat + count) take the image's
    embeddings [first, first + count)."""

    flat: int
    first: int
    count: int
    span: ImageSpan


def image_fills(
    spans: tuple[ImageSpan, ...], start: int, end: int, flat_start: int
) -> list[ImageFill]:
    """The parts of `spans` that a chunk feeding positions [start, end) from flat token
    `flat_start` covers; a chunk may begin or end inside an image (its embeddings are sliced)."""
    fills = []
    for span in spans:
        lo, hi = max(start, span.offset), min(end, span.end)
        if lo < hi:
            fills.append(ImageFill(flat_start + lo - start, lo - span.offset, hi - lo, span))
    return fills


def overlaps_image(spans: tuple[ImageSpan, ...], start: int, end: int) -> bool:
    """Whether any image position lies in [start, end)."""
    return any(max(start, s.offset) < min(end, s.end) for s in spans)
