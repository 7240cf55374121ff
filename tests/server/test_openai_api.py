"""The /v1 routes through the real `openai` client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from server_harness import API_KEY, ServerProcess

MODEL = "tiny-llama"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def native(http: httpx.Client, **body: Any) -> Any:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_matches_native_generate(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL
    assert choice.finish_reason == "length"
    ref = native(http, text="Hello world", sampling_params={"max_new_tokens": 6, "temperature": 0})
    assert choice.text == ref["text"]
    assert r.usage is not None
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens is not None


def test_completion_list_and_token_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["a b c", "d e"], max_tokens=2, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens == 8
    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=1)
    assert len(r.choices) == 2
    assert r.usage is not None and r.usage.prompt_tokens == 5


def test_completion_logprobs_and_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Echo this", max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    choice = r.choices[0]
    assert choice.text.startswith("Echo this")
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert r.usage is not None
    assert len(lp.tokens) == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:] if t)
    assert lp.text_offset is not None and lp.text_offset[0] == 0


def test_completion_stop(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=10, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 :][:2]
    r = client.completions.create(
        model=MODEL, prompt="Stop here", max_tokens=10, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert text.startswith(r.choices[0].text) and stop not in r.choices[0].text


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    ref = client.completions.create(model=MODEL, prompt="Stream it", max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Stream it",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details is not None


def test_chat_completion(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0)
    msg = r.choices[0].message
    assert r.object == "chat.completion"
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    # the prompt went through the chat template: more tokens than the bare words
    assert r.usage.prompt_tokens > 8
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0)
    assert again.choices[0].message.content == msg.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_chat_n2_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        n=2,
        logprobs=True,
        top_logprobs=3,
        seed=7,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert len(c.logprobs.content) == 4
        for entry in c.logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    ref = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ref.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_extra_body_fields(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL,
        prompt="Extras",
        max_tokens=5,
        best_of=1,  # SGLang's bench_serving sends it
        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 5, "stop_token_ids": [2]},
    )  # fmt: skip
    assert r.usage is not None and r.usage.completion_tokens == 5


SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "ok"],
    "additionalProperties": False,
}


def test_structured_output_fields(client: openai.OpenAI, http: httpx.Client) -> None:
    """response_format (json_schema, json_object) and the extra regex / json_schema / ebnf."""
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SMALL_SCHEMA}}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=32,
        temperature=0,
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SMALL_SCHEMA)
    obj = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, response_format={"type": "json_object"}
    )
    assert (obj.choices[0].message.content or "").startswith("{")
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=8, extra_body={"regex": "[0-9]{3}-[a-z]{2}"}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=32, extra_body={"json_schema": SMALL_SCHEMA}
    )
    jsonschema.validate(json.loads(r.choices[0].text), SMALL_SCHEMA)
    out = native(
        http, text="x", sampling_params={"max_new_tokens": 8, "ebnf": 'root ::= "a" | "b"'}
    )
    assert out["text"] in ("a", "b") and out["meta_info"]["finish_reason"]["type"] == "stop"


def test_response_format_output_cut_by_max_tokens_still_parses(client: openai.OpenAI) -> None:
    """Budget-aware closing, with max_tokens the schema's shortest document (11 tokens): on by
    default for response_format, off with close_on_length."""
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "item", "schema": SMALL_SCHEMA}}
    on, off = [], []
    for seed in range(6):
        args: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": 11, "seed": seed}
        on += client.chat.completions.create(**args, response_format=fmt).choices
        off += client.chat.completions.create(
            **args, response_format=fmt, extra_body={"close_on_length": False}
        ).choices
    for choice in on:
        jsonschema.validate(json.loads(choice.message.content or ""), SMALL_SCHEMA)
    assert "length" in {c.finish_reason for c in on}
    cut = [c.message.content or "" for c in off if c.finish_reason == "length"]
    assert cut and not all(text.endswith("}") for text in cut)  # some objects left open


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"model": "gpt-4"}, 404, "model"),
        ({"extra_body": {"regex": "[a-z]+("}}, 400, "regex"),
        ({"extra_body": {"response_format": {"type": "yaml"}}}, 400, "response_format"),
        ({"max_tokens": -1}, 400, "max_tokens"),
        ({"temperature": -0.5}, 400, "temperature"),
    ],
)
def test_errors_reach_the_client(
    client: openai.OpenAI, kwargs: dict[str, Any], status: int, field: str
) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "x", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    assert field in str(info.value.message)


def test_wrong_api_key_is_401(server: ServerProcess) -> None:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with c, pytest.raises(openai.AuthenticationError):
        c.models.list()
