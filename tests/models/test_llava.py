"""LlavaForConditionalGeneration against transformers': logits over prompts with images, in one
forward and split into chunks that cut through an image (the second chunk over the first's K/V)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from image_helpers import write_test_image, write_tiny_llava

from radixlm.core.images import ImageSpan, ImageSpec
from radixlm.core.plan import ScheduledSeq
from radixlm.models.loader import load_model_files
from radixlm.multimodal.inputs import ImageSources, load_images, place_images
from radixlm.multimodal.processor import image_spec
from radixlm.runner.runner import ModelRunner
from radixlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def prepare(
    folder: Path, text: str, images: list[Path]
) -> tuple[ImageSpec, list[int], tuple[ImageSpan, ...]]:
    """radixlm's prompt: ids with pad runs, and the image spans."""
    config, _ = load_model_files(str(folder))
    spec = image_spec(folder, config, Tokenizer.load(str(folder)))
    assert spec is not None
    ids = Tokenizer.load(str(folder)).encode(text)
    loaded = load_images([str(p) for p in images], spec, ImageSources(any_path=True))
    ids, spans = place_images(ids, loaded, spec)
    return spec, ids, spans


@torch.inference_mode()
def hf_logits(folder: Path, spec: ImageSpec, ids: list[int], images: list[Path]) -> torch.Tensor:
    """transformers' logits for the same prompt (each image's run of image tokens)."""
    from PIL import Image

    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixels = processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    hf_ids = [spec.token_id if t >= spec.pad_base else t for t in ids]
    out = model(input_ids=torch.tensor([hf_ids]), pixel_values=pixels)
    return out.logits[0].float()


def run_chunks(folder: Path, ids: list[int], spans: Any, cuts: list[int]) -> torch.Tensor:
    """radixlm's logits for every position, the prompt fed in chunks ending at `cuts`."""
    config, weights = load_model_files(str(folder))
    runner = ModelRunner(config, weights, torch.device("cpu"), torch.float32, num_slots=512)
    slots = torch.arange(len(ids), dtype=torch.int64) + 7  # not the identity, to catch mixups
    out, start = [], 0
    for end in [*cuts, len(ids)]:
        seq = ScheduledSeq(ids[start:end], start, slots[:end], start, spans)
        out.append(runner.forward([seq]))
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("num_images", [1, 2])
def test_logits_match_transformers(tmp_path: Path, tower: str, num_images: int) -> None:
    folder = write_tiny_llava(tmp_path / "m", tower=tower)
    images = [write_test_image(tmp_path / f"{i}.png", (90 - 20 * i, 64), i) for i in range(2)]
    images = images[:num_images]
    text = "A picture: <image>\nand " + "<image> " * (num_images - 1) + "what do you see?"
    spec, ids, spans = prepare(folder, text, images)
    assert len(spans) == num_images and all(s.length == spec.num_tokens for s in spans)
    reference = hf_logits(folder, spec, ids, images)
    cold = run_chunks(folder, ids, spans, [])
    torch.testing.assert_close(cold, reference, atol=1e-4, rtol=0)
    # Cut inside the first image and between the images: each chunk reads the earlier K/V.
    first = spans[0]
    cuts = [first.offset + 5, (spans[1].offset + 3) if num_images == 2 else first.end + 1]
    chunked = run_chunks(folder, ids, spans, cuts)
    torch.testing.assert_close(chunked, reference, atol=1e-4, rtol=0)
    assert torch.equal(chunked[-1].argmax(), reference[-1].argmax())


def test_feature_layer_list_and_full_strategy(tmp_path: Path) -> None:
    """Several feature layers are concatenated; "full" keeps CLIP's class token."""
    folder = write_tiny_llava(
        tmp_path / "m",
        vision_feature_layer=[-3, -1],
        vision_feature_select_strategy="full",
    )
    images = [write_test_image(tmp_path / "a.png", (64, 64), 3)]
    spec, ids, spans = prepare(folder, "<image> Describe it.", images)
    assert spec.num_tokens == 17
    reference = hf_logits(folder, spec, ids, images)
    torch.testing.assert_close(run_chunks(folder, ids, spans, []), reference, atol=1e-4, rtol=0)
