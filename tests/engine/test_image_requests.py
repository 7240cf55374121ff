"""Images through the engine: greedy output and logprobs against transformers' LLaVA, the radix
tree sharing an image's K/V (and only the same image's), the encoder-output cache, chunked
prefill through images, grammars after an image, and bad input refused with nothing disturbed."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from image_helpers import write_test_image

from radixlm.cache.encoder_cache import EncoderCache
from radixlm.engine.engine import Engine

transformers = pytest.importorskip("transformers")

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three random images: 0 and 1 have the same size, 2 another."""
    folder = tmp_path_factory.mktemp("images")
    return [
        write_test_image(folder / "0.png", (80, 60), 10, (0, 100)),  # dark
        write_test_image(folder / "1.png", (80, 60), 11, (150, 256)),  # light
        write_test_image(folder / "2.png", (50, 70), 12),
    ]


@pytest.fixture(scope="module")
def hf(tiny_llava_dir: Path) -> Any:
    """transformers' model and image processor for the tiny LLaVA."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    return model, transformers.AutoImageProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir: Path) -> Iterator[Engine]:
    e = Engine(str(tiny_llava_dir), max_total_tokens=2048, random_seed=0)
    yield e
    e.shutdown()


def image_offset(engine: Engine, text: str) -> int:
    """The prompt position where the first image starts."""
    assert engine.info.image is not None
    return engine.tokenizer.encode(text).index(engine.info.image.token_id)


def model_of(engine: Engine) -> Any:
    return engine.core.runner.model


@torch.inference_mode()
def hf_greedy(
    hf: Any, engine: Engine, text: str, paths: list[Path], n: int
) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation and the logprob of each chosen token."""
    from PIL import Image

    model, processor = hf
    spec = engine.info.image
    assert spec is not None
    ids = engine.tokenizer.encode(text)
    ids = [t for i in ids for t in ([i] * spec.num_tokens if i == spec.token_id else [i])]
    pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    out, lps = [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out]), pixel_values=pixels).logits[0, -1]
        top2 = logits.float().topk(2)
        assert float(top2.values[0] - top2.values[1]) > 1e-4, "too close to call"
        out.append(int(top2.indices[0]))
        lps.append(float(torch.log_softmax(logits.float(), -1)[out[-1]]))
    return out, lps


def check_against_hf(hf: Any, engine: Engine, text: str, paths: list[Path]) -> dict[str, Any]:
    out = engine.generate(text, GREEDY, image_data=[str(p) for p in paths], return_logprob=True)
    assert isinstance(out, dict)
    ids, lps = hf_greedy(hf, engine, text, paths, GREEDY["max_new_tokens"])
    assert out["output_ids"] == ids
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(lps, abs=1e-4)
    engine.check_invariant()
    return out


@pytest.mark.parametrize("num_images", [1, 2])
def test_greedy_matches_transformers_cold_and_cached(
    engine: Engine, hf: Any, images: list[Path], num_images: int
) -> None:
    engine.flush_cache()
    model_of(engine).encoder_cache = EncoderCache()
    encoded = model_of(engine).images_encoded
    paths = [images[0], images[2]][:num_images]
    text = "Look: " + " and ".join(["<image>"] * num_images) + "\nWhat is there?"
    cold = check_against_hf(hf, engine, text, paths)
    assert cold["meta_info"]["cached_tokens"] == 0
    warm = check_against_hf(hf, engine, text, paths)
    # Everything but the last prompt token came from the tree, images included.
    assert warm["meta_info"]["cached_tokens"] == warm["meta_info"]["prompt_tokens"] - 1
    assert model_of(engine).images_encoded - encoded == num_images


def test_same_image_shares_its_kv_and_encodes_once(
    engine: Engine, hf: Any, images: list[Path]
) -> None:
    engine.flush_cache()
    model_of(engine).encoder_cache = EncoderCache()
    encoded = model_of(engine).images_encoded
    spec = engine.info.image
    assert spec is not None
    first = check_against_hf(hf, engine, "<image>\nWhat colour is it?", [images[1]])
    second = check_against_hf(hf, engine, "<image>\nHow many things?", [images[1]])
    assert first["meta_info"]["cached_tokens"] == 0
    image_end = image_offset(engine, "<image>\nHow many things?") + spec.num_tokens
    assert second["meta_info"]["cached_tokens"] >= image_end
    assert model_of(engine).images_encoded - encoded == 1
    # The same image sent as a data URL and as bare base64 is the same image.
    data = base64.b64encode(images[1].read_bytes()).decode()
    for form in (f"data:image/png;base64,{data}", data):
        out = engine.generate("<image>\nWhat colour is it?", GREEDY, image_data=form)
        assert isinstance(out, dict)
        assert out["output_ids"] == first["output_ids"]
        assert out["meta_info"]["cached_tokens"] == out["meta_info"]["prompt_tokens"] - 1
    assert model_of(engine).images_encoded - encoded == 1
    engine.check_invariant()


def test_different_images_of_one_size_never_share(
    engine: Engine, hf: Any, images: list[Path]
) -> None:
    engine.flush_cache()
    text = "<image>\nWhat is this?"
    a = check_against_hf(hf, engine, text, [images[0]])
    b = check_against_hf(hf, engine, text, [images[1]])
    # Only the text before the image (BOS, where the tokenizer adds one) is shared.
    assert b["meta_info"]["cached_tokens"] == image_offset(engine, text)
    # The images matter: sharing a's K/V would have given b a's logprobs, not transformers'.
    lp_a, lp_b = ([lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in (a, b))
    assert max(abs(x - y) for x, y in zip(lp_a, lp_b, strict=True)) > 1e-3
    # A batch with one image per prompt gives each prompt's own answer.
    batch = engine.generate([text, text], GREEDY, image_data=[str(images[0]), str(images[1])])
    assert [o["output_ids"] for o in batch] == [a["output_ids"], b["output_ids"]]
    engine.check_invariant()


def test_chunked_prefill_through_images(tiny_llava_dir: Path, hf: Any, images: list[Path]) -> None:
    """Chunks of 5 tokens cut each 16-token image in four; without an encoder cache the tower
    reruns for each chunk, and either way the output is transformers'."""
    with Engine(
        str(tiny_llava_dir), max_total_tokens=1024, chunked_prefill_size=5, random_seed=0
    ) as e:
        text = "Two: <image> then <image>, compare."
        paths = [images[0], images[2]]
        check_against_hf(hf, e, text, paths)
        assert model_of(e).images_encoded == 2
        e.flush_cache()
        model_of(e).encoder_cache = EncoderCache(max_bytes=0)
        check_against_hf(hf, e, text, paths)
        assert model_of(e).images_encoded > 4


def test_grammar_after_an_image(tiny_llava_dir: Path, images: list[Path]) -> None:
    """A regex after an image: jump-forward gives what one token at a time gives."""
    params = {"max_new_tokens": 20, "temperature": 0, "regex": r"Answer: (yes|no), [a-z]{2,6}\."}
    outs = []
    for disable in (False, True):
        with Engine(
            str(tiny_llava_dir),
            max_total_tokens=1024,
            random_seed=0,
            disable_jump_forward=disable,
        ) as e:
            out = e.generate("<image>\nIs it red?", params, image_data=str(images[0]))
            assert isinstance(out, dict)
            outs.append(out)
            e.check_invariant()
    assert re.fullmatch(params["regex"], outs[0]["text"])
    assert outs[0]["text"] == outs[1]["text"], (outs[0]["text"], outs[1]["text"])


def test_penalties_skip_image_positions(engine: Engine, images: list[Path]) -> None:
    """Repetition penalties read the prompt, whose image positions hold no vocabulary ids."""
    params = {**GREEDY, "repetition_penalty": 1.3, "frequency_penalty": 0.5}
    out = engine.generate("<image> again and again", params, image_data=str(images[2]))
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert len(out["output_ids"]) == GREEDY["max_new_tokens"]
    engine.check_invariant()


def test_bad_image_input_is_refused_and_nothing_else_changes(
    engine: Engine, images: list[Path], tmp_path: Path
) -> None:
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"image_data": str(not_image)}, "cannot decode image"),
        ({"image_data": base64.b64encode(b"x" * 80).decode()}, "cannot decode image"),
        ({"image_data": "data:image/png;base64,@@@"}, "cannot decode image"),
        ({"image_data": str(tmp_path / "missing.png")}, "does not exist"),
        ({"image_data": "http://example.com/a.png"}, "--allow-image-urls"),
        ({"image_data": [str(images[0])] * 2}, "1 image token"),
        ({}, "1 image token"),
        ({"image_data": str(images[0]), "return_logprob": True, "logprob_start_len": 0}, "image"),
    ]
    before = engine.get_stats()
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate("<image> hi", GREEDY, **kwargs)
        engine.check_invariant()
    # Too many images for the context.
    many = "<image>" * 200
    with pytest.raises(ValueError, match="context|pool"):
        engine.generate(many, GREEDY, image_data=[str(images[0])] * 200)
    after = engine.get_stats()
    assert after["num_running_reqs"] == after["num_queue_reqs"] == 0
    assert after["num_forward_passes"] == before["num_forward_passes"]
    out = engine.generate("<image> hi", GREEDY, image_data=str(images[0]))
    assert isinstance(out, dict) and len(out["output_ids"]) == GREEDY["max_new_tokens"]
    engine.check_invariant()


def test_text_only_model_refuses_images(tiny_model_dir: Path, images: list[Path]) -> None:
    with Engine(str(tiny_model_dir), max_total_tokens=512) as e:
        assert e.info.image is None
        with pytest.raises(ValueError, match="takes no images"):
            e.generate("hi", GREEDY, image_data=str(images[0]))
        e.check_invariant()
        out = e.generate("hi", GREEDY)
        assert isinstance(out, dict) and len(out["output_ids"]) == GREEDY["max_new_tokens"]
