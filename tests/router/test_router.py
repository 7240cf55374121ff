"""`radixlm router` in front of two real workers: same answers, cache-aware placement, fan-out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
from conftest import client

from radixlm.server.child_process import ServerProcess
from radixlm.server.native_api import CLEAR_STORAGE_ROUTES

GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def router(
    workers: list[ServerProcess], start_router: Callable[..., ServerProcess]
) -> Iterator[ServerProcess]:
    """A cache-aware router in front of the module's two workers."""
    r = start_router(workers)
    yield r
    r.stop()


def events(resp: httpx.Response) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def test_answers_match_a_direct_worker(router: ServerProcess, workers: list[ServerProcess]) -> None:
    with client(router) as via, client(workers[0]) as direct:
        body = {"text": ["Hello there", "The sky is"], "sampling_params": GREEDY}
        routed = via.post("/generate", json=body)
        assert routed.status_code == 200, routed.text
        assert [o["text"] for o in routed.json()] == [
            o["text"] for o in direct.post("/generate", json=body).json()
        ]
        one = {"text": "Once upon a time", "sampling_params": GREEDY, "stream": True}
        with via.stream("POST", "/generate", json=one) as resp:
            assert resp.status_code == 200
            streamed = events(resp)
        assert (
            streamed[-1]["text"]
            == direct.post("/generate", json={**one, "stream": False}).json()["text"]
        )
        # (the tiny model has no chat template: /v1/completions stands for the OpenAI routes)
        comp = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 6, "temperature": 0}
        a, b = via.post("/v1/completions", json=comp), direct.post("/v1/completions", json=comp)
        assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
        bad = via.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
        assert bad.status_code == 400 and "temperature" in bad.text  # the worker's own error
        assert via.get("/v1/models").json()["data"]
        assert httpx.post(router.url + "/generate", json=one).status_code == 401


def test_shared_prefix_goes_where_it_is_cached(router: ServerProcess) -> None:
    prefix = "You are a careful assistant who answers in one word. " * 6
    with client(router) as http:
        first = http.post(
            "/generate", json={"text": prefix, "sampling_params": {"max_new_tokens": 0}}
        )
        owner = first.headers["X-Radixlm-Worker"]
        n = first.json()["meta_info"]["prompt_tokens"]
        deadline = time.monotonic() + 10
        while not any(
            w["url"] == owner and w["cached_tokens"] >= n for w in http.get("/workers").json()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for q in ("What is red?", "Name a fruit.", "Say hi."):
            resp = http.post("/generate", json={"text": prefix + q, "sampling_params": GREEDY})
            assert resp.headers["X-Radixlm-Worker"] == owner
            assert resp.json()["meta_info"]["cached_tokens"] >= n - 1
        metrics = http.get("/metrics").text
        assert f'radixlm_router:requests_total{{worker="{owner}",reason="cache"}} 3' in metrics


def test_control_routes_fan_out(router: ServerProcess, workers: list[ServerProcess]) -> None:
    with client(router) as http:
        info = http.get("/get_server_info").json()
        assert sorted(w["url"] for w in info["workers"]) == sorted(w.url for w in workers)
        assert len(info["internal_states"]) == 2
        assert http.post("/abort_request", json={"rid": "nothing"}).json() == {"aborted": 0}
        flushed = http.post("/flush_cache")
        assert flushed.status_code == 200, flushed.text
        for method, path in CLEAR_STORAGE_ROUTES:  # the workers have no disk tier to clear
            cleared = http.request(method, path)
            assert cleared.status_code == 400 and "no disk KV tier" in cleared.text, path
        deadline = time.monotonic() + 10
        while any(w["cached_tokens"] for w in http.get("/workers").json()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = http.get("/metrics").text
        for w in workers:
            assert f'sglang:num_requests_total{{worker="{w.url}"' in metrics
        assert http.get("/health").status_code == 200


def test_consistent_hash_is_sticky(
    workers: list[ServerProcess], start_router: Callable[..., ServerProcess]
) -> None:
    r = start_router(workers, "--policy", "consistent_hash")
    try:
        with client(r) as http:
            placed: dict[str, set[str]] = {}
            # 24 keys over a ring of 160 points a worker: all on one worker has odds ~2**-23.
            for i in range(48):
                key = f"user-{i % 24}"
                body = {"text": f"turn {i}", "sampling_params": {"max_new_tokens": 1}}
                resp = http.post("/generate", json=body, headers={"X-Routing-Key": key})
                placed.setdefault(key, set()).add(resp.headers["X-Radixlm-Worker"])
                comp = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1, "user": key}
                resp = http.post("/v1/completions", json=comp)
                assert resp.status_code == 200, resp.text
                placed[key].add(resp.headers["X-Radixlm-Worker"])
            assert all(len(v) == 1 for v in placed.values())
            assert len({next(iter(v)) for v in placed.values()}) == 2  # the keys use both
    finally:
        r.stop()


def test_post_workers_adds_one(
    workers: list[ServerProcess], start_router: Callable[..., ServerProcess]
) -> None:
    r = start_router(workers[:1], "--policy", "round_robin")
    try:
        with client(r) as http:
            added = http.post("/workers", json={"url": workers[1].url})
            assert added.status_code == 200 and added.json()["healthy"], added.text
            seen = {
                http.post(
                    "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1}}
                ).headers["X-Radixlm-Worker"]
                for _ in range(4)
            }
            assert seen == {w.url for w in workers}
            deadline = time.monotonic() + 10
            while not all(w["synced"] for w in http.get("/workers").json()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert (
                http.request("DELETE", "/workers", json={"url": workers[1].url}).status_code == 200
            )
            assert len(http.get("/workers").json()) == 1
    finally:
        r.stop()


def generated(workers: list[ServerProcess]) -> int:
    """Tokens the workers generated so far, all requests together."""
    total = 0
    for w in workers:
        with client(w) as http:
            for line in http.get("/metrics").text.splitlines():
                if line.startswith("sglang:generation_tokens_total"):
                    total += int(float(line.rsplit(" ", 1)[1]))
    return total


def wait_workers_idle(workers: list[ServerProcess]) -> None:
    deadline = time.monotonic() + 30
    for w in workers:
        with client(w) as http:
            while True:
                state = http.get("/get_server_info").json()["internal_states"][0]
                if state["num_running_reqs"] + state["num_queue_reqs"] == 0:
                    break
                assert time.monotonic() < deadline, state
                time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_aborts_the_request_on_its_worker(
    router: ServerProcess, workers: list[ServerProcess], stream: bool
) -> None:
    long = {"max_new_tokens": 1500, "ignore_eos": True}
    body = {"text": "Leave me", "sampling_params": long, "stream": stream}
    wait_workers_idle(workers)
    before = generated(workers)
    if stream:
        with client(router) as via, via.stream("POST", "/generate", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # leaving the block closed the connection after the first event
    else:
        with client(router, timeout=1.0) as via, pytest.raises(httpx.ReadTimeout):
            via.post("/generate", json=body)
    wait_workers_idle(workers)
    ran = generated(workers) - before
    assert ran < 1500, f"the request ran on after its client left ({ran} tokens)"
