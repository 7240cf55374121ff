"""A request's images: read from where the client says (a file, a data URL, base64, an http(s)
URL), decoded and preprocessed, and placed in the prompt as runs of pad ids."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from radixlm.core.images import ImageSpan, ImageSpec
from radixlm.multimodal.processor import pad_value, pixel_digest, preprocess

MAX_IMAGE_BYTES = 32 << 20  # an encoded image larger than this is refused
URL_TIMEOUT_S = 10.0
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


@dataclass(frozen=True)
class ImageSources:
    """Where images may come from. A server reads local files only under `image_dir` and
    fetches http(s) URLs only with `allow_urls`; the in-process Engine (`any_path`) reads any
    file its caller names."""

    image_dir: str | None = None
    allow_urls: bool = False
    any_path: bool = False

    def read(self, source: str) -> bytes:
        """The encoded bytes of an image; ValueError naming what is wrong."""
        if not isinstance(source, str) or not source:
            raise ValueError("an image must be given as a non-empty string")
        if source.startswith("data:"):
            header, sep, payload = source.partition(",")
            if not sep or not header.endswith(";base64"):
                raise ValueError("an image data URL must be base64 (data:image/...;base64,...)")
            return _b64decode(payload)
        if source.startswith(("http://", "https://")):
            return self._fetch(source)
        if source.startswith("file://"):
            return self._read_file(source.removeprefix("file://"))
        if len(source) >= 64 and _BASE64.fullmatch(source):
            return _b64decode(source)
        return self._read_file(source)

    def _read_file(self, name: str) -> bytes:
        path = Path(name).expanduser()
        if not self.any_path:
            if self.image_dir is None:
                raise ValueError(
                    "local image paths are refused: start the server with --image-dir to allow "
                    "files under a folder, or send the image as a data URL or base64"
                )
            root = Path(self.image_dir).resolve()
            path = (root / path).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"image path {name!r} is outside --image-dir")
        if not path.is_file():
            raise ValueError(f"image file {name!r} does not exist")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"image file {name!r} is larger than {MAX_IMAGE_BYTES} bytes")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        if not self.allow_urls:
            raise ValueError(
                "image URLs are refused: start the server with --allow-image-urls to fetch them, "
                "or send the image as a data URL or base64"
            )
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:  # noqa: S310
                data: bytes = resp.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise ValueError(f"cannot fetch image {url!r}: {e}") from e
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"image {url!r} is larger than {MAX_IMAGE_BYTES} bytes")
        return data


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image base64 does not decode: {e}") from e


def decode_image(data: bytes) -> Image.Image:
    """A decoded image; ValueError for bytes that are no image Pillow reads."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from e
    return image


def load_images(
    sources: list[str], spec: ImageSpec, where: ImageSources
) -> list[tuple[str, np.ndarray]]:
    """(digest, pixels) of each image, in order; ValueError for one that cannot be used."""
    out = []
    want = (3, spec.image_size, spec.image_size)
    for source in sources:
        pixels = preprocess(decode_image(where.read(source)), spec.processor, spec.image_size)
        if pixels.shape != want:
            raise ValueError(
                f"preprocessor_config.json makes {pixels.shape} pixels, the vision tower takes {want}"
            )
        out.append((pixel_digest(pixels), pixels))
    return out


def per_prompt_images(image_data: Any, num_prompts: int) -> list[list[str]]:
    """SGLang's `image_data` as a list of image sources per prompt: for one prompt a string or
    a list; for a batch a list with one entry (a string, a list, or None) per prompt."""
    if image_data is None:
        return [[] for _ in range(num_prompts)]

    def as_list(item: Any) -> list[str]:
        if item is None:
            return []
        items = item if isinstance(item, list) else [item]
        if not all(isinstance(i, str) for i in items):
            raise ValueError("image_data entries must be strings (paths, URLs, base64)")
        return items

    if num_prompts == 1 and not (
        isinstance(image_data, list) and image_data and isinstance(image_data[0], list)
    ):
        return [as_list(image_data)]
    if not isinstance(image_data, list) or len(image_data) != num_prompts:
        raise ValueError(f"image_data must have one entry per prompt ({num_prompts})")
    return [as_list(item) for item in image_data]


def place_images(
    ids: list[int], images: list[tuple[str, np.ndarray]], spec: ImageSpec
) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """The prompt with each image token replaced by its image's run of pad ids, and the spans.
    The prompt must hold one image token per image."""
    found = ids.count(spec.token_id)
    if found != len(images):
        raise ValueError(
            f"the prompt has {found} image token(s) ({spec.token_text!r}) for "
            f"{len(images)} image(s); put one {spec.token_text!r} where each image goes"
        )
    out: list[int] = []
    spans: list[ImageSpan] = []
    it = iter(images)
    for token in ids:
        if token != spec.token_id:
            out.append(token)
            continue
        digest, pixels = next(it)
        pad = pad_value(spec, digest)
        spans.append(ImageSpan(len(out), spec.num_tokens, digest, pad, pixels))
        out.extend([pad] * spec.num_tokens)
    return out, tuple(spans)
