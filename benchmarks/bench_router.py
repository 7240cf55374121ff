"""The router's own overhead, against fake workers that answer at once.

Starts N fake workers (one process; /generate answers a fixed body, /cache_events sends an empty
snapshot) and `radixlm router` in front of them, then measures from this process:
- added latency: p50 of one request at a time through the router, minus the same direct;
- throughput: requests/s through the router with `--concurrency` requests in flight.

    python benchmarks/bench_router.py --requests 400 --seconds 5 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import time

import radixlm  # noqa: F401  (sets OMP_WAIT_POLICY before anything loads OpenMP)

ANSWER = (
    b'{"text": " Paris.", "output_ids": [1, 2], "meta_info": {"id": "x", "prompt_tokens": 8, '
    b'"completion_tokens": 2, "cached_tokens": 0, "finish_reason": {"type": "length", "length": 2}}}'
)
PROMPT = "You are a helpful assistant. Answer briefly. What is the capital of France? " * 4


def _fake_workers(socks: list[socket.socket], tokenizer_path: str) -> None:
    import orjson
    import uvicorn

    info = orjson.dumps({"model_path": tokenizer_path, "tokenizer_path": tokenizer_path})

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/cache_events":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            body = b'{"snapshot": [], "events": []}\n'
            await send({"type": "http.response.body", "body": body, "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        while (await receive()).get("more_body"):
            pass
        body = {"/generate": ANSWER, "/model_info": info}.get(path, b"")
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def main() -> None:
        servers = [
            uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
            for _ in socks
        ]
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, socks, strict=True)))

    asyncio.run(main())


async def _latencies(url: str, n: int) -> list[float]:
    import httpx

    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
    out = []
    async with httpx.AsyncClient(base_url=url) as client:
        for i in range(n + 20):
            t0 = time.perf_counter()
            resp = await client.post("/generate", json=body)
            if i >= 20:  # warm-up
                out.append(time.perf_counter() - t0)
            assert resp.status_code == 200, resp.text
    return out


async def _throughput(url: str, seconds: float, concurrency: int) -> float:
    import httpx

    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
    done = 0
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                resp = await client.post("/generate", json=body)
                assert resp.status_code == 200
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def main() -> None:
    """Run the benchmark and print its figures."""
    from radixlm.models.default import default_model_path
    from radixlm.server.child_process import ServerProcess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--requests", type=int, default=400, help="sequential requests per latency run")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--tokenizer-path", default=None, help="default: the embedded SmolLM2")
    a = p.parse_args()
    tokenizer = a.tokenizer_path or default_model_path()
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(a.workers)]
    for s in socks:  # accepted connections inherit it: no delayed-ACK stalls on small answers
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    fake = multiprocessing.get_context("fork").Process(
        target=_fake_workers, args=(socks, tokenizer), daemon=True
    )
    fake.start()
    router = ServerProcess.start(
        ["--worker-urls", *urls, "--policy", a.policy, "--log-level", "warning"],
        command="router",
    )
    try:
        import httpx

        while not httpx.get(router.url + "/get_server_info").json()["router"]["tokenizer_ready"]:
            time.sleep(0.1)
        direct = asyncio.run(_latencies(urls[0], a.requests))
        routed = asyncio.run(_latencies(router.url, a.requests))
        added_ms = (statistics.median(routed) - statistics.median(direct)) * 1e3
        rps = asyncio.run(_throughput(router.url, a.seconds, a.concurrency))
        direct_rps = asyncio.run(_throughput(urls[0], a.seconds, a.concurrency))
    finally:
        router.stop()
        fake.terminate()
    print(f"policy {a.policy}, {a.workers} fake workers, prompt {len(PROMPT)} chars")
    print(
        f"p50 latency direct {statistics.median(direct) * 1e3:.2f} ms, "
        f"via router {statistics.median(routed) * 1e3:.2f} ms: added {added_ms:.2f} ms"
    )
    print(f"throughput via router {rps:.0f} req/s (direct to one fake worker {direct_rps:.0f} "
          f"req/s) at concurrency {a.concurrency}")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
