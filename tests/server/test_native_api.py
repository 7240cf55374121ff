"""SGLang's native routes over raw HTTP: /generate (batch, streaming, logprobs, caching) and control."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from server_harness import TINY_CONTEXT, TINY_POOL, ServerProcess

GREEDY = {"temperature": 0}


def generate(http: httpx.Client, **body: Any) -> Any:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(http: httpx.Client, **body: Any) -> list[Any]:
    """The JSON events of a streaming /generate; asserts it ends with [DONE]."""
    events: list[Any] = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        events.append(json.loads(line[len("data: ") :]))
    return events


def test_generate_single(http: httpx.Client) -> None:
    out = generate(
        http, text="The capital of France is", sampling_params={"max_new_tokens": 8, **GREEDY}
    )
    meta = out["meta_info"]
    assert len(out["output_ids"]) == meta["completion_tokens"] == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] > 0
    assert isinstance(out["text"], str) and out["text"]
    assert {"id", "cached_tokens"} <= set(meta)


def test_generate_batch_keeps_order_and_matches_single(http: httpx.Client) -> None:
    prompts = ["One two three", "Alpha beta", "Hello"]
    params = {"max_new_tokens": 5, **GREEDY}
    batch = generate(http, text=prompts, sampling_params=params)
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, out in zip(prompts, batch, strict=True):
        alone = generate(http, text=prompt, sampling_params=params)
        assert out["output_ids"] == alone["output_ids"]


def test_generate_input_ids_batch_with_per_item_params(http: httpx.Client) -> None:
    outs = generate(
        http,
        input_ids=[[10, 11, 12], [20, 21]],
        sampling_params=[{"max_new_tokens": 2, **GREEDY}, {"max_new_tokens": 4, **GREEDY}],
    )
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 2]
    assert [len(o["output_ids"]) for o in outs] == [2, 4]


def test_generate_n_fans_out(http: httpx.Client) -> None:
    outs = generate(
        http, text="Sample me", sampling_params={"max_new_tokens": 4, "n": 2}, rid="fan"
    )
    assert [o["meta_info"]["id"] for o in outs] == ["fan-0", "fan-1"]


def test_streaming_is_cumulative_and_matches_non_streaming(http: httpx.Client) -> None:
    params = {"max_new_tokens": 12, **GREEDY}
    events = stream_events(http, text="Once upon a time", sampling_params=params)
    assert len(events) >= 2
    for prev, cur in zip(events, events[1:], strict=False):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    full = generate(http, text="Once upon a time", sampling_params=params)
    assert events[-1]["output_ids"] == full["output_ids"]
    assert events[-1]["text"] == full["text"]


def test_batch_streaming_tags_events_with_index(http: httpx.Client) -> None:
    events = stream_events(http, text=["a b", "c d e"], sampling_params={"max_new_tokens": 3})
    last: dict[int, Any] = {}
    for e in events:
        last[e["index"]] = e
    assert sorted(last) == [0, 1]
    assert all(len(e["output_ids"]) == 3 for e in last.values())


@pytest.mark.parametrize("start", [0, 1, 3])
def test_prompt_logprob_alignment(http: httpx.Client, start: int) -> None:
    out = generate(
        http,
        text="The quick brown fox jumps",
        sampling_params={"max_new_tokens": 3, **GREEDY},
        return_logprob=True,
        logprob_start_len=start,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == start + len(meta["input_token_logprobs"])
    assert (meta["input_token_logprobs"][0][0] is None) == (start == 0)
    assert len(meta["output_token_logprobs"]) == 3
    assert [t[1] for t in meta["output_token_logprobs"]] == out["output_ids"]
    assert len(meta["output_top_logprobs"]) == 3 and len(meta["input_top_logprobs"]) == len(
        meta["input_token_logprobs"]
    )
    # greedy: the chosen token is the top-1 candidate
    for chosen, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert chosen[1] == top[0][1]
        assert isinstance(chosen[2], str)


def test_decode_logprobs_equal_reprefill_logprobs(http: httpx.Client) -> None:
    prompt = "Decode and prefill must agree on"
    out = generate(
        http, text=prompt, sampling_params={"max_new_tokens": 10, **GREEDY}, return_logprob=True
    )
    prompt_len = out["meta_info"]["prompt_tokens"]
    decoded = out["meta_info"]["output_token_logprobs"]
    prompt_ids = [t[1] for t in generate(
        http, text=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )["meta_info"]["input_token_logprobs"]]  # fmt: skip
    again = generate(
        http,
        input_ids=prompt_ids + out["output_ids"],
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=prompt_len,
    )
    reprefill = again["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in reprefill] == [t[1] for t in decoded]
    for (a, _, _), (b, _, _) in zip(decoded, reprefill, strict=True):
        assert abs(a - b) < 1e-4


def test_max_new_tokens_zero_caches_the_prompt(http: httpx.Client) -> None:
    prompt = "A prompt that nobody else in this suite sends, to be cached " * 4
    first = generate(http, text=prompt, sampling_params={"max_new_tokens": 0})
    assert first["output_ids"] == [] and first["meta_info"]["completion_tokens"] == 0
    assert first["meta_info"]["finish_reason"]["type"] == "length"
    assert first["meta_info"]["cached_tokens"] == 0
    second = generate(http, text=prompt, sampling_params={"max_new_tokens": 1})
    n = second["meta_info"]["prompt_tokens"]
    assert second["meta_info"]["cached_tokens"] >= n - 1 > 0


def test_stop_string_is_trimmed(http: httpx.Client) -> None:
    free = generate(http, text="Stop test", sampling_params={"max_new_tokens": 12, **GREEDY})
    # a piece of the greedy text from its middle becomes the stop string
    stop = free["text"][len(free["text"]) // 2 :][:3]
    out = generate(
        http, text="Stop test", sampling_params={"max_new_tokens": 12, "stop": stop, **GREEDY}
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"]
    assert free["text"].startswith(out["text"])


def test_info_routes(http: httpx.Client, server: ServerProcess) -> None:
    for route in ("/model_info", "/get_model_info"):
        info = http.get(route).json()
        assert info["is_generation"] is True
        assert info["served_model_name"] == "tiny-llama"
        assert info["model_path"].endswith("tiny-llama")
    for route in ("/server_info", "/get_server_info"):
        info = http.get(route).json()
        assert info["max_total_num_tokens"] == TINY_POOL
        assert info["context_len"] == TINY_CONTEXT
        assert info["kernel_backend"] in ("cpu-kernels", "torch")
        assert info["gemm"] == "F.linear" or info["gemm"].startswith(("stream", "mkl", "onednn"))
        assert info["port"] == int(server.url.rsplit(":", 1)[1])
        assert info["gc_frozen_objects"] > 10_000  # the engine process froze its start-up heap
        assert info["server_gc_frozen_objects"] > 10_000  # and the server's process its own
        assert "version" in info and "num_running_reqs" in info["internal_states"][0]
        assert "api_key" not in json.dumps(info)
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200


def test_flush_cache_refuses_while_running_then_works(
    server: ServerProcess, http: httpx.Client
) -> None:
    generate(http, text="something to cache", sampling_params={"max_new_tokens": 0})
    body = {"text": "long", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    refusals = []
    # On a loaded machine the tiny model may finish its 2000 tokens before the flush call is
    # served (and then the flush rightly succeeds), so try a few times for a refusal.
    for _ in range(5):
        with (
            server.client() as c,
            c.stream("POST", "/generate", json={**body, "stream": True}) as r,
        ):
            next(r.iter_lines())  # it is running
            answer = http.post("/flush_cache")
        if answer.status_code != 200:
            refusals.append(answer)
            break
    assert refusals, "flush_cache never refused while a request was running"
    refused = refusals[0]
    assert refused.status_code == 400 and "running" in refused.json()["error"]["message"]
    # leaving the stream aborted the request; its end reaches the server a moment later
    deadline = time.monotonic() + 30
    while (flushed := http.post("/flush_cache")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flushed.status_code == 200, flushed.text
    again = generate(http, text="something to cache", sampling_params={"max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] == 0


def test_abort_request_by_rid(http: httpx.Client) -> None:
    result: list[Any] = []

    def run() -> None:
        body = {
            "text": "abort me",
            "rid": "to-abort",
            "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True},
        }
        result.append(http.post("/generate", json=body).json())

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while http.post("/abort_request", json={"rid": "to-abort"}).json()["aborted"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t.join(60)
    meta = result[0]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 1500
    assert http.post("/abort_request", json={"rid": "no-such-rid"}).json() == {"aborted": 0}


def test_parse_generate_accepts_what_sglang_clients_send() -> None:
    from radixlm.server.native_protocol import parse_generate

    inp = parse_generate(
        {
            "text": "x",
            "input_ids": None,
            "sampling_params": {"max_new_tokens": 4, "regex": None, "json_schema": None},
            "stream": True,
            "lora_path": None,
            "return_logprob": False,
            "logprob_start_len": -1,
        }
    )
    assert inp.text == "x" and inp.stream and inp.logprob_start_len == -1
