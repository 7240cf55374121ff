"""The router's worth and its cost.

`cache`: two engine servers (one thread each, as `serve --dp 2` on a 2-core machine) behind a
cache_aware and a round_robin router, and a single engine holding both pools. Workload: G
shared prefixes (random token ids) with P questions each, arrival interleaved across prefixes,
pools that hold about half the prefixes each. The configurations alternate within the run (the
caches flushed before each); each prints the cache hit rate (cached / prompt tokens), requests/s,
prompt tokens/s, p50 / p99 TTFT and the requests each worker got. `--skew` sends that share of
the requests to one hot prefix instead. `--configs` picks the configurations: router policies
(`cache_aware:queue` is cache_aware with `--load-metric queue`) and `single`; each round ends
with the p99 TTFT of each.

    python benchmarks/bench_router.py cache --groups 32 --prefix-len 1000 --questions 4 \\
        --pool 16000 --layers 6 --rounds 2
    python benchmarks/bench_router.py cache ... --configs cache_aware,cache_aware:queue,shortest_queue

`overhead`: fake workers (one process each, HTTP by hand on uvloop; /generate answers a fixed
body at once) behind `radixlm router`, load generators (likewise) in processes of their own:
- added latency: p50 of one request at a time through the router, minus the same direct;
- throughput: requests/s through the router with `--concurrency` requests in flight per client,
  and the router process's CPU time per request over those runs.

    python benchmarks/bench_router.py overhead --requests 400 --seconds 5 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import radixlm  # noqa: F401  (sets OMP_WAIT_POLICY before anything loads OpenMP)
from radixlm.utils import progress

ANSWER = (
    b'{"text": " Paris.", "output_ids": [1, 2], "meta_info": {"id": "x", "prompt_tokens": 8, '
    b'"completion_tokens": 2, "cached_tokens": 0, "finish_reason": {"type": "length", "length": 2}}}'
)
PROMPT = "You are a helpful assistant. Answer briefly. What is the capital of France? " * 4
BODY = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
SINGLE = "single"  # the --configs name of one engine holding both pools


# ---------------------------------------------------------------------------------------------
# overhead


def _answer(body: bytes, head: bytes = b"content-type: application/json\r\n") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)


class FakeWorker(asyncio.Protocol):
    """One connection to a fake worker: HTTP/1.1 with keep-alive, parsed by hand (the cheapest
    server Python has, so that the router, not the worker, is what the load measures);
    /generate answers ANSWER at once, /cache_events an empty snapshot and then nothing."""

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer."""
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            if (i := head.find(b"\r\ncontent-length:")) >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            if path == b"/cache_events":
                event = b'{"snapshot": [], "events": []}\n'
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                    b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
                )
                return  # the stream stays open; nothing more comes on this connection
            self.transport.write(self.answers.get(path, _answer(b"")))


def _fake_worker(sock: socket.socket, tokenizer_path: str) -> None:
    import orjson
    import uvloop

    info = orjson.dumps({"model_path": tokenizer_path, "tokenizer_path": tokenizer_path})
    answers = {b"/generate": _answer(ANSWER), b"/model_info": _answer(info)}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FakeWorker(answers), sock=sock)
        await server.serve_forever()

    uvloop.run(serve())


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """One request on a kept-alive connection, its whole answer read (HTTP/1.1, with a
    content-length, as both the router and the fake workers answer)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    lower = head.lower()
    i = lower.index(b"\r\ncontent-length:") + 17
    await reader.readexactly(int(lower[i : lower.index(b"\r\n", i)]))


def _load(url: str, mode: str, amount: float, concurrency: int, out: Any) -> None:
    """A load generator process (uvloop, HTTP written and read by hand, as cheap as the fake
    workers): `latency` sends `amount` requests one at a time and reports their latencies;
    `throughput` keeps `concurrency` in flight, one per connection, for `amount` seconds and
    reports how many completed."""
    import orjson
    import uvloop

    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = orjson.dumps(BODY)
    request = (
        b"POST /generate HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )

    async def main() -> Any:
        if mode == "latency":
            reader, writer = await asyncio.open_connection(host, int(port))
            times = []
            for i in range(int(amount) + 20):
                t0 = time.perf_counter()
                await _post(reader, writer, request)
                if i >= 20:  # warm-up
                    times.append(time.perf_counter() - t0)
            writer.close()
            return times
        done = 0
        end = time.perf_counter() + amount

        async def loop() -> None:
            nonlocal done
            reader, writer = await asyncio.open_connection(host, int(port))
            while time.perf_counter() < end:
                await _post(reader, writer, request)
                done += 1
            writer.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done, time.perf_counter() - t0

    out.put(uvloop.run(main()))


def _run_load(url: str, mode: str, amount: float, concurrency: int, clients: int) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_load, args=(url, mode, amount, concurrency, out))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def _rps(results: list[tuple[int, float]]) -> float:
    return sum(n for n, _ in results) / max(t for _, t in results)


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (utime + stime from /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(a: argparse.Namespace) -> None:
    """Router overhead against fake workers."""
    import httpx

    from radixlm.models.default import default_model_path
    from radixlm.server.child_process import ServerProcess

    tokenizer = a.tokenizer_path or default_model_path()
    socks = [socket.create_server(("127.0.0.1", 0), backlog=2048) for _ in range(a.workers)]
    for s in socks:  # accepted connections inherit it: no delayed-ACK stalls on small answers
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    fork = multiprocessing.get_context("fork")
    fakes = [fork.Process(target=_fake_worker, args=(s, tokenizer), daemon=True) for s in socks]
    for f in fakes:
        f.start()
    router = ServerProcess.start(
        ["--worker-urls", *urls, "--policy", a.policy, "--log-level", "warning"],
        command="router",
        die_with_parent=True,
    )
    try:
        while not httpx.get(router.url + "/get_server_info").json()["router"]["tokenizer_ready"]:
            time.sleep(0.1)
        direct, routed, rps, direct_rps, cpu = [], [], [], [], []
        with progress(4 * a.rounds, "direct / via router", "run") as bar:
            for _ in range(a.rounds):  # alternate, so that both see the same machine
                direct += _run_load(urls[0], "latency", a.requests, 1, 1)[0]
                bar.update()
                routed += _run_load(router.url, "latency", a.requests, 1, 1)[0]
                bar.update()
                cpu0 = cpu_seconds(router.proc.pid)
                results = _run_load(router.url, "rps", a.seconds, a.concurrency, a.clients)
                cpu.append((cpu_seconds(router.proc.pid) - cpu0) / sum(n for n, _ in results))
                rps.append(_rps(results))
                bar.update()
                direct_rps.append(
                    _rps(_run_load(urls[0], "rps", a.seconds, a.concurrency, a.clients))
                )
                bar.update()
    finally:
        router.stop()
        for f in fakes:
            f.terminate()
    added_ms = (statistics.median(routed) - statistics.median(direct)) * 1e3
    print(f"policy {a.policy}, {a.workers} fake workers, prompt {len(PROMPT)} chars")
    print(
        f"p50 latency direct {statistics.median(direct) * 1e3:.2f} ms, "
        f"via router {statistics.median(routed) * 1e3:.2f} ms: added {added_ms:.2f} ms"
    )
    print(
        f"throughput via router {', '.join(f'{r:.0f}' for r in rps)} req/s (direct to one fake "
        f"worker {', '.join(f'{r:.0f}' for r in direct_rps)} req/s); {a.clients} load "
        f"generator processes x {a.concurrency} in flight"
    )
    per_request = statistics.median(cpu)
    print(
        f"router CPU time per request {per_request * 1e6:.0f} us "
        f"(runs {', '.join(f'{c * 1e6:.0f}' for c in cpu)}): {1 / per_request:.0f} req/s per core; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# cache


def truncated_model(layers: int, folder: Path) -> Path:
    """The embedded SmolLM2-135M with only its first `layers` layers (same width, attention and
    vocabulary): a prefill as a real model's, a few times cheaper."""
    from safetensors.torch import load_file, save_file

    from radixlm.models.default import default_model_path
    from radixlm.models.gguf import convert_gguf

    source = convert_gguf(default_model_path())
    config = json.loads((source / "config.json").read_text())
    if layers >= config["num_hidden_layers"]:
        return source
    config["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(str(source / "model.safetensors"))
    kept = {
        k: v
        for k, v in weights.items()
        if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers
    }
    save_file(kept, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


@dataclasses.dataclass
class Run:
    """One configuration's figures over one pass of the workload."""

    name: str
    seconds: float
    requests: int
    prompt_tokens: int
    cached_tokens: int
    ttft: list[float]
    workers: Counter[str]

    @property
    def p99(self) -> float:
        """The 99th percentile of TTFT, in seconds."""
        ttft = sorted(self.ttft)
        return ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]

    def row(self) -> str:
        """The figures as one printed line."""
        spread = "/".join(str(n) for _, n in sorted(self.workers.items()))
        return (
            f"{self.name:17s} hit rate {self.cached_tokens / self.prompt_tokens:6.1%}  "
            f"{self.requests / self.seconds:6.2f} req/s  "
            f"{self.prompt_tokens / self.seconds:7.0f} prompt tok/s  "
            f"TTFT p50 {statistics.median(self.ttft):6.2f} s p99 {self.p99:6.2f} s  "
            f"requests per worker {spread}  ({self.seconds:.1f} s)"
        )


def workload(a: argparse.Namespace, seed: int) -> list[list[int]]:
    """The prompts in arrival order: round q asks question q of every prefix (with skew, that
    share of all requests goes to prefix 0 instead)."""
    rng = random.Random(seed)
    ids = range(1000, 40000)  # ordinary tokens of SmolLM2's vocabulary
    prefixes = [[rng.choice(ids) for _ in range(a.prefix_len)] for _ in range(a.groups)]
    # Each round in its own random order: in a fixed one, round robin would send a prefix to
    # the same worker every round when the workers divide the prefixes.
    order = [g for _ in range(a.questions) for g in rng.sample(range(a.groups), a.groups)]
    if a.skew:
        order = [0 if rng.random() < a.skew else g for g in order]
    return [prefixes[g] + [rng.choice(ids) for _ in range(a.question_len)] for g in order]


async def _drive(url: str, prompts: list[list[int]], a: argparse.Namespace, name: str) -> Run:
    import aiohttp
    import orjson

    params = {"max_new_tokens": a.output_len, "temperature": 0, "ignore_eos": True}
    queue = list(reversed(prompts))
    run = Run(name, 0.0, 0, 0, 0, [], Counter())
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:

        async def client() -> None:
            while queue:
                ids = queue.pop()
                body = {"input_ids": ids, "sampling_params": params, "stream": True}
                t0 = time.perf_counter()
                first = None
                async with session.post("/generate", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    run.workers[resp.headers.get("X-Radixlm-Worker", url)] += 1
                    last = b""
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            first = first or time.perf_counter()
                            last = line
                meta = orjson.loads(last[6:])["meta_info"]
                run.ttft.append((first or time.perf_counter()) - t0)
                run.requests += 1
                run.prompt_tokens += meta["prompt_tokens"]
                run.cached_tokens += meta["cached_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(a.concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


def cache(a: argparse.Namespace) -> None:
    """Router policies over two engines (by default cache_aware vs round_robin), and one engine
    with both pools."""
    import httpx

    from radixlm.server.child_process import ServerProcess

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    model = truncated_model(a.layers, tmp / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--model-path", str(model), "--log-level", "warning", "--random-seed", "0"]
    started: list[ServerProcess] = []

    def start(*extra: str, command: str = "serve") -> ServerProcess:
        server = ServerProcess.start([*flags, *extra] if command == "serve" else list(extra),
                                     env=env, timeout=600.0, command=command,
                                     die_with_parent=True)  # fmt: skip
        started.append(server)
        return server

    try:
        workers = [start("--max-total-tokens", str(a.pool)) for _ in range(2)]
        single = start("--max-total-tokens", str(2 * a.pool)) if SINGLE in a.configs else None
        urls = [w.url for w in workers]
        routers = {}
        for name in a.configs:
            if name == SINGLE:
                continue
            policy, _, metric = name.partition(":")
            extra = ["--load-metric", metric] if metric else []
            routers[name] = start(
                "--worker-urls", *urls, "--policy", policy, *extra, "--log-level", "warning",
                command="router",
            )  # fmt: skip
        for r in routers.values():
            while not httpx.get(r.url + "/get_server_info").json()["router"]["tokenizer_ready"]:
                time.sleep(0.2)
        targets = {
            name: single.url if name == SINGLE and single else routers[name].url
            for name in a.configs
        }
        prompts = workload(a, seed=0)
        tokens = sum(map(len, prompts))
        print(
            f"{len(prompts)} requests: {a.groups} prefixes x {a.prefix_len} tokens, "
            f"{a.questions} questions of {a.question_len} each"
            f"{f' (skew {a.skew:.0%} to one prefix)' if a.skew else ''}, output {a.output_len}, "
            f"{tokens} prompt tokens; pool {a.pool} slots per engine; {a.concurrency} in flight; "
            f"SmolLM2-135M truncated to {a.layers} layers"
        )
        runs: dict[str, list[Run]] = {name: [] for name in targets}
        with progress(a.rounds * len(targets), " / ".join(targets), "run") as bar:
            for _ in range(a.rounds):
                for name, url in targets.items():
                    for target in [*urls, *([single.url] if single else [])]:
                        assert httpx.post(target + "/flush_cache", timeout=60).status_code == 200
                    time.sleep(0.5)  # the routers' mirrors see the flush
                    label = "single engine" if name == SINGLE else name
                    run = asyncio.run(_drive(url, prompts, a, label))
                    runs[name].append(run)
                    bar.write(run.row())
                    sys.stdout.flush()
                    bar.update()
        for i in range(a.rounds):
            if "cache_aware" in runs and "round_robin" in runs:
                c, r = runs["cache_aware"][i], runs["round_robin"][i]
                hit = (c.cached_tokens / c.prompt_tokens) / max(
                    r.cached_tokens / r.prompt_tokens, 1e-9
                )
                print(
                    f"round {i + 1}: cache_aware / round_robin: hit rate {hit:.2f}x, "
                    f"throughput {r.seconds / c.seconds:.2f}x"
                )
            p99s = ", ".join(f"{name} {runs[name][i].p99:.2f} s" for name in a.configs)
            print(f"round {i + 1}: TTFT p99 {p99s}")
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="the router's cost against fake workers")
    o.add_argument("--workers", type=int, default=2)
    o.add_argument("--requests", type=int, default=400, help="sequential requests per latency run")
    o.add_argument("--seconds", type=float, default=5.0, help="length of a throughput run")
    o.add_argument("--concurrency", type=int, default=64, help="in flight per load generator")
    o.add_argument("--clients", type=int, default=2, help="load generator processes")
    o.add_argument("--rounds", type=int, default=2, help="alternations of direct and routed")
    o.add_argument("--policy", default="cache_aware")
    o.add_argument("--tokenizer-path", default=None, help="default: the embedded SmolLM2")
    c = sub.add_parser("cache", help="cache_aware vs round_robin over two real engines")
    c.add_argument("--groups", type=int, default=32, help="shared prefixes")
    c.add_argument("--prefix-len", type=int, default=1000)
    c.add_argument("--questions", type=int, default=4, help="requests per prefix")
    c.add_argument("--question-len", type=int, default=16)
    c.add_argument("--output-len", type=int, default=8)
    c.add_argument("--pool", type=int, default=16000, help="KV slots per engine")
    c.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    c.add_argument("--skew", type=float, default=0.0, help="share of requests to one prefix")
    c.add_argument("--layers", type=int, default=6, help="SmolLM2 layers kept (30: all)")
    c.add_argument("--rounds", type=int, default=1, help="alternations of the configurations")
    c.add_argument(
        "--configs",
        type=lambda v: v.split(","),
        default=["cache_aware", "round_robin", SINGLE],
        help="comma-separated: router policies (cache_aware:queue: with --load-metric queue) "
        f"and {SINGLE} (one engine holding both pools)",
    )
    a = p.parse_args()
    overhead(a) if a.command == "overhead" else cache(a)


if __name__ == "__main__":
    main()
