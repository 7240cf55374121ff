"""Preprocessing against transformers' own image processors (CLIP: shortest edge + center crop;
SigLIP: straight resize), on odd sizes, both orientations, and non-RGB modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radixlm.multimodal.processor import pixel_digest, preprocess

transformers = pytest.importorskip("transformers")


def random_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(97, 61, "RGB"), (40, 130, "RGB"), (336, 336, "RGBA"), (51, 77, "L"), (20, 10, "RGB")],
)
def test_clip_preprocessing_matches_transformers(width: int, height: int, mode: str) -> None:
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 48}
    )
    cfg = proc.to_dict()
    image = random_image(width, height, mode, width)
    expected = proc(image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, cfg, 56)
    assert got.shape == expected.shape == (3, 56, 48)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_siglip_preprocessing_matches_transformers() -> None:
    proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    image = random_image(70, 45, "RGB", 1)
    expected = proc(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, proc.to_dict(), 32), expected, atol=1e-5, rtol=0)


def test_digest_depends_on_every_pixel() -> None:
    a = preprocess(random_image(30, 30, "RGB", 0), {"size": {"height": 8, "width": 8}}, 8)
    b = a.copy()
    b[2, 7, 7] += 1e-3
    assert pixel_digest(a) == pixel_digest(a.copy())
    assert pixel_digest(a) != pixel_digest(b)
