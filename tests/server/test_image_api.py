"""Images over HTTP: native image_data and OpenAI image_url parts on a tiny LLaVA server, the
same answers as the in-process engine; bad images, paths outside --image-dir and URLs without
--allow-image-urls get a 400, and the server keeps serving; a text-only server refuses images."""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from image_helpers import write_test_image
from server.server_harness import ServerProcess

from radixlm.engine.engine import Engine

GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served-images")
    write_test_image(folder / "a.png", (70, 50), 1)
    return folder


@pytest.fixture(scope="module")
def llava_server(
    tiny_llava_dir: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("llava-server") / "server.log"
    flags = ["--random-seed", "0", "--max-total-tokens", "2048", "--image-dir", str(image_dir)]
    srv = ServerProcess.start(tiny_llava_dir, log, *flags)
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def model_name(http: httpx.Client) -> str:
    name: str = http.get("/v1/models").json()["data"][0]["id"]
    return name


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_native_and_openai_image_requests(
    llava_server: ServerProcess, tiny_llava_dir: Path, image_dir: Path
) -> None:
    image = image_dir / "a.png"
    with Engine(str(tiny_llava_dir), max_total_tokens=1024, random_seed=0) as e:
        expected = e.generate("<image>\nWhat is it?", GREEDY, image_data=str(image))
        assert isinstance(expected, dict)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ]
        rendered = e.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\nWhat is it?"}], add_generation_prompt=True
        )
        chat_expected = e.generate(rendered, GREEDY, image_data=str(image))
        assert isinstance(chat_expected, dict)
    with llava_server.client() as http:
        assert http.get("/model_info").json()["image_token"] == "<image>"
        for source in ("a.png", data_url(image), base64.b64encode(image.read_bytes()).decode()):
            body = {"text": "<image>\nWhat is it?", "sampling_params": GREEDY, "image_data": source}
            out = http.post("/generate", json=body).json()
            assert out["output_ids"] == expected["output_ids"], out
        # The last two found the image's K/V cached.
        assert out["meta_info"]["cached_tokens"] == out["meta_info"]["prompt_tokens"] - 1
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": model_name(http),
                "messages": messages,
                "max_tokens": 5,
                "temperature": 0,
                "ignore_eos": True,
            },
        ).json()
        assert chat["choices"][0]["message"]["content"] == chat_expected["text"]
        assert http.get("/internal/check_invariant").json() == {"ok": True}


def bad_requests(outside: Path) -> list[tuple[dict[str, Any], str]]:
    return [
        ({"image_data": "data:image/png;base64,AAAA"}, "cannot decode image"),
        ({"image_data": str(outside)}, "outside --image-dir"),
        ({"image_data": "../" + outside.name}, "outside --image-dir"),
        ({"image_data": "http://127.0.0.1:1/a.png"}, "--allow-image-urls"),
        ({"image_data": 3}, "image_data"),
        ({"image_data": ["a.png", "a.png"]}, "image token"),
    ]


def test_bad_images_get_400_and_the_server_keeps_serving(
    llava_server: ServerProcess, image_dir: Path, tmp_path: Path
) -> None:
    outside = write_test_image(image_dir.parent / "outside.png", (8, 8), 2)
    with llava_server.client() as http:
        for extra, message in bad_requests(outside):
            body = {"text": "<image> hi", "sampling_params": GREEDY, **extra}
            r = http.post("/generate", json=body)
            assert r.status_code == 400, r.text
            assert message in r.text, r.text
        bad_chat = {
            "model": model_name(http),
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        }
        r = http.post("/v1/chat/completions", json=bad_chat)
        assert r.status_code == 400, r.text
        assert http.get("/internal/check_invariant").json() == {"ok": True}
        ok = http.post(
            "/generate",
            json={"text": "<image> hi", "sampling_params": GREEDY, "image_data": "a.png"},
        )
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 5


def test_text_only_server_refuses_images(http: httpx.Client, image_dir: Path) -> None:
    body = {"text": "hi", "sampling_params": GREEDY, "image_data": data_url(image_dir / "a.png")}
    r = http.post("/generate", json=body)
    assert r.status_code == 400 and "takes no images" in r.text, r.text
    assert http.get("/model_info").json()["image_token"] is None
    chat = {
        "model": model_name(http),
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}],
            }
        ],
    }
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "takes no images" in r.text, r.text
    assert http.post("/generate", json={"text": "hi", "sampling_params": GREEDY}).status_code == 200
