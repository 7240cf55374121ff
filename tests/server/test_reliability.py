"""Bad input, authentication, many concurrent streams and client disconnects: nothing else breaks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import TINY_POOL, ServerProcess, metric, parse_metrics, running, wait_idle

from radixlm.tokenizer import Tokenizer

G = "/generate"
C = "/v1/completions"
CHAT = "/v1/chat/completions"
ABORT = "/abort_request"
MSG = [{"role": "user", "content": "hi"}]
TOO_LONG_FOR_POOL = [7] * (TINY_POOL + 10)  # fits the 4096 context, not the KV pool
TOO_LONG_FOR_CONTEXT = [7] * 5000
LONG = 2400  # output tokens that fit the pool: a request that runs for seconds unless aborted

# (route, body, status, what the error message must name)
BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    (G, b"{not json", 400, "JSON"),
    (G, b"[1, 2]", 400, "object"),
    (G, {"text": "x", "bogus": 1}, 400, "bogus"),
    (G, {"text": "x", "input_ids": [1]}, 400, "input_ids"),
    (G, {"sampling_params": {}}, 400, "text"),
    (G, {"text": 5}, 400, "text"),
    (G, {"text": ""}, 400, "empty"),
    (G, {"text": []}, 400, "empty"),
    (G, {"input_ids": [1, "a"]}, 400, "input_ids"),
    (G, {"input_ids": [10**9]}, 400, "input_ids"),
    (G, {"input_ids": TOO_LONG_FOR_CONTEXT}, 400, "context length"),
    (G, {"input_ids": TOO_LONG_FOR_POOL}, 400, "KV cache"),
    (G, {"text": "x", "sampling_params": {"max_new_tokens": 5000}}, 400, "context length"),
    (G, {"text": "x", "sampling_params": "hot"}, 400, "sampling_params"),
    (G, {"text": "x", "sampling_params": {"warmth": 1}}, 400, "warmth"),
    (G, {"text": "x", "sampling_params": {"temperature": -1}}, 400, "temperature"),
    (G, {"text": "x", "sampling_params": {"top_p": 0}}, 400, "top_p"),
    (G, {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    (G, {"text": "x", "sampling_params": {"max_new_tokens": "ten"}}, 400, "max_new_tokens"),
    (G, {"text": "x", "sampling_params": {"n": 0}}, 400, "n must"),
    (G, {"text": "x", "sampling_params": {"stop_token_ids": [10**9]}}, 400, "stop_token_ids"),
    (G, {"text": "x", "sampling_params": {"regex": "a(+"}}, 400, "invalid regex"),
    (G, {"text": "x", "sampling_params": {"json_schema": "{"}}, 400, "json_schema"),
    (G, {"text": "x", "sampling_params": {"ebnf": "root ::= b"}}, 400, "invalid ebnf"),
    (G, {"text": "x", "sampling_params": {"regex": "a", "ebnf": "root ::= 'a'"}}, 400, "one of"),
    (G, {"text": ["x", "y"], "sampling_params": [{}]}, 400, "sampling_params"),
    (G, {"text": "x", "return_logprob": "yes"}, 400, "return_logprob"),
    (G, {"text": "x", "logprob_start_len": -5}, 400, "logprob_start_len"),
    (G, {"text": "x", "top_logprobs_num": -1}, 400, "top_logprobs_num"),
    (G, {"text": "x", "stream": "yes"}, 400, "stream"),
    (G, {"text": ["x", "y"], "rid": ["same", "same"]}, 400, "rid"),
    (G, {"text": "x", "lora_path": "adapter"}, 400, "lora_path"),
    # more requests than even an idle server takes: was a 503 that a client retries forever
    (G, {"text": "x", "sampling_params": {"n": 10**6}}, 400, "1000000 requests"),
    # parsed as the float 1e30: was counted as one request, then built 1e30 of them (out of memory)
    (G, {"text": "x", "sampling_params": {"n": 10**30}}, 400, "requests"),
    (ABORT, {"rid": "x", "abort_all": "yes"}, 400, "abort_all"),  # was 200, abort_all ignored
    (ABORT, {"rid": 5, "abort_all": True}, 400, "rid"),  # was 200, rid ignored
    (C, b"{", 400, "JSON"),
    (C, {"model": "nope", "prompt": "x"}, 404, "model"),
    (C, {"max_tokens": 2}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [1, "a"]}, 400, "prompt"),
    (C, {"prompt": [10**9]}, 400, "prompt"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    (C, {"prompt": "x", "top_p": 2}, 400, "top_p"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    (C, {"prompt": "x", "ebnf": "root ::= b"}, 400, "ebnf"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "n": 10**6}, 400, "requests"),
    (CHAT, {"model": "nope", "messages": MSG}, 404, "model"),
    (CHAT, {"max_tokens": 2}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "json_schema": {"type": "objekt"}}, 400, "objekt"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "named"),
    BAD_INPUTS,
    ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_INPUTS)],
)
def test_bad_input(http: httpx.Client, route: str, body: Any, status: int, named: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(route, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert named in error["message"], error
    assert error["code"] == status and error["type"]
    assert set(error) == {"message", "type", "param", "code"}


def test_server_unharmed_after_bad_inputs(http: httpx.Client) -> None:
    r = http.post(G, json={"text": "still fine", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    assert http.get("/internal/check_invariant").json() == {"ok": True}
    assert running(http) == 0


@pytest.mark.parametrize("route", ["/generate", "/v1/models", "/server_info", "/flush_cache"])
def test_api_key_required(server: ServerProcess, route: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        r = httpx.request(
            "POST" if route in (G, "/flush_cache") else "GET", server.url + route, headers=headers
        )
        assert r.status_code == 401
        assert "API key" in r.json()["error"]["message"]


def test_health_and_metrics_need_no_key(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_route_is_404_in_openai_shape(http: httpx.Client) -> None:
    r = http.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_wrong_method_is_405_with_allow(http: httpx.Client) -> None:
    r = http.delete(G)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    assert r.headers["allow"] == "POST"  # RFC 9110; the error handler used to drop it
    # A path that two routes serve (one method each) names both methods.
    r = http.request("OPTIONS", "/clear_hicache_storage_backend")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def generated_tokens(http: httpx.Client) -> float:
    return metric(parse_metrics(http.get("/metrics").text), "sglang:generation_tokens_total")


def test_64_concurrent_streams(
    server: ServerProcess, tiny_server_model: Path, http: httpx.Client
) -> None:
    tok = Tokenizer.load(str(tiny_server_model))
    n_clients, n_tokens = 64, 16

    async def one(client: httpx.AsyncClient, i: int) -> list[Any]:
        body = {
            "text": f"Client number {i} asks",
            "sampling_params": {"max_new_tokens": n_tokens, "ignore_eos": True},
            "stream": True,
        }
        events = []
        async with client.stream("POST", G, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                elif line == "data: [DONE]":
                    events.append(None)
        return events

    async def main() -> list[list[Any]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(n_clients)))

    results = asyncio.run(main())
    ids = set()
    for events in results:
        assert events[-1] is None, "the stream must end with [DONE]"
        events = events[:-1]
        for prev, cur in zip(events, events[1:], strict=False):
            assert cur["text"].startswith(prev["text"])
            assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        last = events[-1]
        assert len(last["output_ids"]) == n_tokens
        assert last["meta_info"]["finish_reason"] == {"type": "length", "length": n_tokens}
        # the streamed text is the detokenized output (a trailing partial character may be held)
        assert tok.decode(last["output_ids"]).startswith(last["text"])
        ids.add(last["meta_info"]["id"])
    assert len(ids) == n_clients
    wait_idle(http)
    assert http.get("/internal/check_invariant").json() == {"ok": True}


def test_disconnect_mid_stream_aborts_and_keeps_invariant(
    server: ServerProcess, http: httpx.Client
) -> None:
    wait_idle(http)
    before = generated_tokens(http)
    body = {
        "text": "Talk for a long time",
        "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True},
    }
    with server.client() as client, client.stream("POST", G, json={**body, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    # the client closed its connection with the stream unfinished
    wait_idle(http)
    assert generated_tokens(http) - before < LONG
    assert http.get("/internal/check_invariant").json() == {"ok": True}
    r2 = http.post(
        G, json={"text": "after the disconnect", "sampling_params": {"max_new_tokens": 4}}
    )
    assert r2.status_code == 200 and len(r2.json()["output_ids"]) == 4


def test_disconnect_while_waiting_aborts(server: ServerProcess, http: httpx.Client) -> None:
    wait_idle(http)
    before = generated_tokens(http)
    body = {"text": "Wait for me", "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}
    with server.client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(G, json=body)
    wait_idle(http)
    assert generated_tokens(http) - before < LONG
    assert http.get("/internal/check_invariant").json() == {"ok": True}
    r = http.post(
        CHAT.replace("/chat/completions", "/completions"), json={"prompt": "ok", "max_tokens": 2}
    )
    assert r.status_code == 200
