"""OpenAI request bodies: strict parsing, errors naming the field, translation to SGLang's params."""

from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm.server.errors import ApiError
from radixlm.server.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body


def parse(model: Any, body: dict[str, Any]) -> Any:
    return parse_body(model, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),  # strings are not numbers
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "surprise": 1}, "surprise"),
        ({}, "prompt"),
    ],
)
def test_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(CompletionRequest, body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.message.startswith(param)


def test_not_an_object_and_not_json() -> None:
    with pytest.raises(ApiError, match="JSON object"):
        parse_body(CompletionRequest, b"[]")
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_body(CompletionRequest, b"{")


def test_sampling_params_translation() -> None:
    req = parse(
        CompletionRequest,
        {"prompt": "x", "temperature": 0, "seed": 3, "min_tokens": 2, "stop": ["a"], "top_k": 4},
    )
    assert req.sampling_params(9) == {
        "max_new_tokens": 9,
        "min_new_tokens": 2,
        "n": 1,
        "temperature": 0.0,
        "top_k": 4,
        "stop": ["a"],
        "ignore_eos": False,
        "sampling_seed": 3,
        "skip_special_tokens": True,
    }


def test_close_on_length_is_an_extra_field() -> None:
    fmt = {"type": "json_object"}
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    req = parse(ChatCompletionRequest, body)
    assert "close_on_length" not in req.sampling_params(9)  # the engine's default: on
    off = parse(ChatCompletionRequest, {**body, "close_on_length": False}).sampling_params(9)
    assert off["close_on_length"] is False and off["json_schema"] == {"type": "object"}


def test_chat_text_parts_are_joined() -> None:
    req = parse(
        ChatCompletionRequest,
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "name": "bot"},
            ]
        },
    )
    assert req.conversation() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "name": "bot"},
    ]
