"""Where images may come from (files only under --image-dir, URLs only when allowed), SGLang's
image_data shapes, and image tokens becoming runs of pad ids."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from image_helpers import write_test_image

from radixlm.core.images import ImageSpec, image_fills
from radixlm.multimodal.inputs import ImageSources, per_prompt_images, place_images


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server over tmp_path; its base URL."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_local_paths_only_under_image_dir(tmp_path: Path) -> None:
    inside = tmp_path / "images"
    inside.mkdir()
    image = write_test_image(inside / "a.png", (8, 8), 0)
    outside = write_test_image(tmp_path / "b.png", (8, 8), 1)
    (inside / "escape.png").symlink_to(outside)
    where = ImageSources(image_dir=str(inside))
    assert where.read("a.png") == image.read_bytes()
    assert where.read(str(image)) == image.read_bytes()
    assert where.read(f"file://{image}") == image.read_bytes()
    for bad in ("../b.png", str(outside), "escape.png", f"file://{outside}"):
        with pytest.raises(ValueError, match="outside --image-dir"):
            where.read(bad)
    with pytest.raises(ValueError, match="--image-dir"):
        ImageSources().read(str(image))
    assert ImageSources(any_path=True).read(str(outside)) == outside.read_bytes()


def test_data_urls_and_base64(tmp_path: Path) -> None:
    data = write_test_image(tmp_path / "a.png", (8, 8), 0).read_bytes()
    b64 = base64.b64encode(data).decode()
    assert ImageSources().read(f"data:image/png;base64,{b64}") == data
    assert ImageSources().read(b64) == data
    with pytest.raises(ValueError, match="base64"):
        ImageSources().read("data:image/png,rawbytes")


def test_urls_only_when_allowed(tmp_path: Path, served: str) -> None:
    data = write_test_image(tmp_path / "a.png", (8, 8), 0).read_bytes()
    with pytest.raises(ValueError, match="--allow-image-urls"):
        ImageSources().read(f"{served}/a.png")
    assert ImageSources(allow_urls=True).read(f"{served}/a.png") == data
    with pytest.raises(ValueError, match="cannot fetch"):
        ImageSources(allow_urls=True).read(f"{served}/missing.png")


def test_image_data_shapes() -> None:
    assert per_prompt_images(None, 2) == [[], []]
    assert per_prompt_images("a", 1) == [["a"]]
    assert per_prompt_images(["a", "b"], 1) == [["a", "b"]]
    assert per_prompt_images([["a", "b"]], 1) == [["a", "b"]]
    assert per_prompt_images(["a", None], 2) == [["a"], []]
    assert per_prompt_images([["a"], ["b", "c"]], 2) == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match="one entry per prompt"):
        per_prompt_images(["a"], 2)
    with pytest.raises(ValueError, match="strings"):
        per_prompt_images([3], 1)


def test_place_images_and_fills() -> None:
    spec = ImageSpec(9, "<image>", 3, 100, 8, {})
    pixels = np.zeros((3, 8, 8), np.float32)
    ids, spans = place_images([1, 9, 2, 9], [("aa" * 32, pixels), ("bb" * 32, pixels)], spec)
    a, b = spans
    assert ids == [1, a.pad, a.pad, a.pad, 2, b.pad, b.pad, b.pad]
    assert (a.offset, a.end, b.offset, b.end) == (1, 4, 5, 8)
    assert a.pad != b.pad and min(a.pad, b.pad) >= spec.pad_base
    # A chunk feeding positions [3, 6) from flat token 10: a's last row, then b's first.
    fills = image_fills(spans, 3, 6, 10)
    assert [(f.flat, f.first, f.count, f.span) for f in fills] == [(10, 2, 1, a), (12, 0, 1, b)]
    with pytest.raises(ValueError, match="2 image token"):
        place_images([9, 9], [("aa" * 32, pixels)], spec)
