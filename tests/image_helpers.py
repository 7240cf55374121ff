"""Test images for the multimodal tests (a module of its own: each test folder's conftest
shadows tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_test_image(
    path: Path, size: tuple[int, int], seed: int, levels: tuple[int, int] = (0, 256)
) -> Path:
    """A random RGB PNG of `size` (width, height), its values drawn from [levels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(*levels, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
