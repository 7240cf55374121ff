"""Serving benchmark, modelled on SGLang's bench_serving.

Streams requests to a radixlm (or SGLang) server and reports requests/s, input and output
tokens/s, TTFT / ITL / end-to-end latency (mean, p50, p99) and the cache hit rate. Unless
--base-url is given, it starts `radixlm serve` on a free port itself and stops it at the end.

python benchmarks/bench_serving.py                    # shared-prefix workload against a server
python benchmarks/bench_serving.py --dataset-name random --request-rate 4 --max-concurrency 8
python benchmarks/bench_serving.py --compare-engine   # served / in-process throughput (>= 0.90)
python benchmarks/bench_serving.py --ttft-cached      # TTFT, cached / uncached prefix (<= 0.25)
python benchmarks/bench_serving.py --peer-llama-server F32 --plot  # radixlm vs llama-server, 3 datasets
python benchmarks/bench_serving.py --peer-url http://host:8080     # vs any OpenAI-compatible server
python benchmarks/bench_serving.py --peer-llama-server F32 --datasets prefill  # one prompt at a time

Datasets: generated-shared-prefix (SGLang's: groups of questions after a shared system prompt),
random (nothing shared), multiturn (chats whose turns resend the history), and prefill: distinct
prompts of --prefill-len tokens and 1 output token, sent one at a time (its prompt tokens/s is
single-request prefill speed).

Prompts are random whole words of the model's vocabulary, so that their text re-tokenizes to the
intended token count; --token-ids sends the same prompts as token ids instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plots import add_plot_arg, bar_charts  # benchmarks/plots.py

from radixlm.server.child_process import ServerProcess, kill_when_parent_exits
from radixlm.tokenizer import Tokenizer
from radixlm.utils import progress

if TYPE_CHECKING:
    import aiohttp

    from radixlm.engine.engine import Engine

SERVER_START_TIMEOUT_S = 600.0
SEPARATOR = "\n\n"  # between system prompt and question, as in SGLang's generated-shared-prefix


# ---- workload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt of the workload; `input_ids` is what the server's tokenizer makes of `text`."""

    text: str
    input_ids: list[int]
    output_len: int
    group: int  # the shared prefix it belongs to (its own index in the random dataset)


class PromptMaker:
    """Random text of an exact token length: whole words (` word` tokens) re-tokenize 1:1."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.words = [
            i
            for i in range(tokenizer.vocab_size)
            if re.fullmatch(r" [a-z]{2,}", tokenizer.decode([i], skip_special_tokens=False))
        ]
        if len(self.words) < 1000:
            raise ValueError("the tokenizer has too few ` word` tokens to build prompts")

    def text(self, num_tokens: int) -> str:
        """A string that encodes to `num_tokens` tokens (without special tokens)."""
        ids = [self.rng.choice(self.words) for _ in range(num_tokens)]
        text = self.tokenizer.decode(ids)
        for _ in range(8):  # BPE may merge across words; trim or pad until the count matches
            n = len(self.tokenizer.encode(text, add_special_tokens=False))
            if n == num_tokens:
                break
            if n > num_tokens:
                ids = ids[: len(ids) - (n - num_tokens)]
            else:
                ids += [self.rng.choice(self.words) for _ in range(num_tokens - n)]
            text = self.tokenizer.decode(ids)
        return text


def generated_shared_prefix(
    maker: PromptMaker,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int,
    shuffle: bool = True,
) -> list[BenchRequest]:
    """groups x prompts: a shared system prompt per group + a distinct question each."""
    tokenizer = maker.tokenizer
    requests: list[BenchRequest] = []
    for g in range(num_groups):
        system = maker.text(system_prompt_len)
        prefix_ids = tokenizer.encode(system)
        for _ in range(prompts_per_group):
            text = system + SEPARATOR + maker.text(question_len)
            ids = tokenizer.encode(text)
            # The cache can only hit if the prefix tokenizes the same inside every prompt.
            assert ids[: len(prefix_ids)] == prefix_ids, "the system prompt does not tokenize apart"
            requests.append(BenchRequest(text, ids, output_len, g))
    if shuffle:
        random.Random(seed).shuffle(requests)
    return requests


def random_prompts(
    maker: PromptMaker, num_prompts: int, input_len: int, output_len: int
) -> list[BenchRequest]:
    """Distinct prompts of `input_len` tokens each; nothing shared beyond chance."""
    requests = []
    for i in range(num_prompts):
        text = maker.text(input_len)
        requests.append(BenchRequest(text, maker.tokenizer.encode(text), output_len, i))
    return requests


@dataclass(frozen=True, slots=True)
class Conversation:
    """A multi-turn chat: each turn's prompt is the whole history (earlier prompts and the
    answers the server gave) plus the next user message, so turns run one after another."""

    turns: list[str]  # the user's messages
    output_len: int


def multiturn(
    maker: PromptMaker, num_conversations: int, turns: int, question_len: int, output_len: int
) -> list[Conversation]:
    """Conversations of `turns` user messages of `question_len` tokens each."""
    return [
        Conversation([maker.text(question_len) for _ in range(turns)], output_len)
        for _ in range(num_conversations)
    ]


def turn_prompt(history: str, message: str) -> str:
    """The prompt of the next turn: the history, the user's message, and the answer's cue."""
    return f"{history}{SEPARATOR}User:{message}{SEPARATOR}Assistant:"


@dataclass(frozen=True)
class Workload:
    """The requests of a run (or its conversations), and a short one to warm up with."""

    requests: list[BenchRequest]
    warmup: BenchRequest
    conversations: list[Conversation] = field(default_factory=list)


def arrival_times(n: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets in seconds: a Poisson process at `request_rate`; all zero when it is inf."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


# ---- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request; times in seconds from sending it."""

    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""


def _pcts(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, p50, p99) in ms; nan when there are no values."""
    if not values:
        return math.nan, math.nan, math.nan
    a = np.asarray(values) * 1000
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


@dataclass(frozen=True)
class RunMetrics:
    """SGLang bench_serving's figures for one run of a workload."""

    completed: int
    failed: int
    duration: float
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    ttft_ms: tuple[float, float, float]  # mean, p50, p99
    itl_ms: tuple[float, float, float]
    e2e_ms: tuple[float, float, float]
    first_error: str = ""

    @classmethod
    def of(cls, results: Sequence[RequestResult], duration: float) -> RunMetrics:
        """Aggregate the successful requests (failures are only counted)."""
        ok = [r for r in results if r.ok]
        failed = [r for r in results if not r.ok]
        return cls(
            completed=len(ok),
            failed=len(failed),
            duration=duration,
            input_tokens=sum(r.prompt_tokens for r in ok),
            output_tokens=sum(r.completion_tokens for r in ok),
            cached_tokens=sum(r.cached_tokens for r in ok),
            ttft_ms=_pcts([r.ttft for r in ok if not math.isnan(r.ttft)]),
            itl_ms=_pcts([x for r in ok for x in r.itl]),
            e2e_ms=_pcts([r.latency for r in ok if not math.isnan(r.latency)]),
            first_error=failed[0].error if failed else "",
        )

    @property
    def request_throughput(self) -> float:
        """Completed requests per second."""
        return self.completed / self.duration

    @property
    def input_throughput(self) -> float:
        """Prompt tokens per second."""
        return self.input_tokens / self.duration

    @property
    def output_throughput(self) -> float:
        """Generated tokens per second."""
        return self.output_tokens / self.duration

    @property
    def cache_hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens."""
        return self.cached_tokens / max(self.input_tokens, 1)


def _row(label: str, value: object) -> None:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    print(f"{label:<42}{text}")


def print_metrics(title: str, setup: dict[str, object], m: RunMetrics) -> None:
    """SGLang's summary block."""
    print(f"{f' {title} ':=^60}")
    for k, v in setup.items():
        _row(k + ":", v)
    _row("Successful requests:", m.completed)
    if m.failed:
        _row("Failed requests:", f"{m.failed} (first error: {m.first_error[:200]})")
    _row("Benchmark duration (s):", m.duration)
    _row("Total input tokens:", m.input_tokens)
    _row("Total generated tokens:", m.output_tokens)
    _row("Request throughput (req/s):", m.request_throughput)
    _row("Input token throughput (tok/s):", m.input_throughput)
    _row("Output token throughput (tok/s):", m.output_throughput)
    _row("Cache hit rate (cached / prompt tokens):", f"{m.cache_hit_rate:.1%}")
    for name, (mean, p50, p99) in (
        ("TTFT", m.ttft_ms),
        ("ITL", m.itl_ms),
        ("E2E latency", m.e2e_ms),
    ):
        if not math.isnan(mean):
            _row(f"{name} mean / p50 / p99 (ms):", f"{mean:.1f} / {p50:.1f} / {p99:.1f}")
    print("=" * 60)


# ---- HTTP client -----------------------------------------------------------------------------


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The JSON payloads of a text/event-stream's `data:` lines, up to `data: [DONE]` (other
    lines, such as comments and event names, are skipped)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line.removeprefix(b"data:").strip()
                if data == b"[DONE]":
                    return
                try:
                    yield json.loads(data)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not JSON in the stream: {data[:200]!r}") from e


@dataclass(frozen=True)
class HttpClient:
    """Streams one request to /generate (native) or /v1/completions (openai) and times it."""

    session: aiohttp.ClientSession
    base_url: str
    backend: str
    token_ids: bool
    model: str = ""

    async def send(self, req: BenchRequest) -> RequestResult:
        """Send, read the whole stream, and return what the client measured."""
        prompt: str | list[int] = req.input_ids if self.token_ids else req.text
        if self.backend == "openai":
            url = self.base_url + "/v1/completions"
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": req.output_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        else:
            url = self.base_url + "/generate"
            body = {
                ("input_ids" if self.token_ids else "text"): prompt,
                "sampling_params": {
                    "max_new_tokens": req.output_len,
                    "temperature": 0.0,
                    "ignore_eos": True,
                },
                "stream": True,
            }
        out = RequestResult()
        start = last = time.perf_counter()
        seen = 0  # tokens received so far
        try:
            async with self.session.post(url, json=body) as resp:
                if resp.status != 200:
                    out.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                    return out
                async for event in _sse_events(resp):
                    if "error" in event:
                        out.error = str(event["error"])
                        return out
                    now = time.perf_counter()
                    if self.backend == "openai":
                        if usage := event.get("usage"):
                            out.prompt_tokens = usage["prompt_tokens"]
                            out.completion_tokens = usage["completion_tokens"]
                            details = usage.get("prompt_tokens_details") or {}
                            out.cached_tokens = details.get("cached_tokens", 0)
                        # Tokens per chunk are unknown here: one ITL sample per chunk, as SGLang.
                        piece = event["choices"][0]["text"] if event["choices"] else ""
                        out.text += piece
                        new = 1 if piece else 0
                    else:
                        out.text = event["text"]
                        meta = event["meta_info"]
                        out.prompt_tokens = meta["prompt_tokens"]
                        out.cached_tokens = meta["cached_tokens"]
                        out.completion_tokens = meta["completion_tokens"]
                        new = out.completion_tokens - seen
                    if new <= 0:
                        continue
                    if seen == 0:
                        out.ttft = now - start
                    else:  # tokens that came together share the gap (SGLang's adjusted ITL)
                        out.itl.extend([(now - last) / new] * new)
                    seen += new
                    last = now
        except Exception as e:  # a benchmark reports a failed request and goes on
            out.error = f"{type(e).__name__}: {e}"
            return out
        out.latency = time.perf_counter() - start
        out.completion_tokens = out.completion_tokens or seen  # a server that sent no usage
        out.ok = out.completion_tokens > 0
        if not out.ok:
            out.error = "the stream ended without any token"
        return out


async def run_load(
    send: Callable[[BenchRequest], Awaitable[RequestResult]],
    requests: Sequence[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
) -> tuple[list[RequestResult], float]:
    """Send on a Poisson schedule with at most `max_concurrency` in flight; (results, wall time)."""
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    bar = progress(len(requests), "served", "req")

    async def one(req: BenchRequest) -> RequestResult:
        async with limit:
            result = await send(req)
        bar.update()
        return result

    tasks = []
    with bar:
        t0 = time.perf_counter()
        for req, at in zip(requests, arrival_times(len(requests), request_rate, seed), strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


async def run_conversations(
    send: Callable[[BenchRequest], Awaitable[RequestResult]],
    conversations: Sequence[Conversation],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
) -> tuple[list[RequestResult], float]:
    """Conversations start on a Poisson schedule, at most `max_concurrency` at once; each sends
    its turns in order, every prompt carrying the answers so far. (every turn's result, wall)"""
    limit = asyncio.Semaphore(max_concurrency or len(conversations))
    bar = progress(sum(len(c.turns) for c in conversations), "served turns", "req")

    async def one(i: int, conv: Conversation) -> list[RequestResult]:
        results = []
        async with limit:
            history = ""
            for message in conv.turns:
                prompt = turn_prompt(history, message)
                result = await send(BenchRequest(prompt, [], conv.output_len, i))
                results.append(result)
                bar.update()
                if not result.ok:
                    break
                history = prompt + result.text
        return results

    with bar:
        t0 = time.perf_counter()
        tasks = []
        times = arrival_times(len(conversations), request_rate, seed)
        for i, (conv, at) in enumerate(zip(conversations, times, strict=True)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, conv)))
        done = await asyncio.gather(*tasks)
        return [r for rs in done for r in rs], time.perf_counter() - t0


def _session(force_close: bool = False) -> aiohttp.ClientSession:
    """A client session without a connection limit; `force_close`: a new connection per request
    (llama-server closes kept-alive connections that the client may be about to reuse)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=3600),
    )


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """GET (or POST `body`) and parse the JSON answer; plain text comes back as a string."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode()


def flush_cache(base_url: str) -> None:
    """Empty the server's radix cache (it refuses while requests run)."""
    http_json(base_url + "/flush_cache", {})


async def connect(
    session: aiohttp.ClientSession, base_url: str, args: argparse.Namespace, warmup: BenchRequest
) -> HttpClient:
    """A client for --backend (the OpenAI API needs the served model's name), warmed up."""
    model = ""
    if args.backend == "openai":
        async with session.get(base_url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
    client = HttpClient(session, base_url, args.backend, args.token_ids, model)
    warm = await client.send(warmup)
    if not warm.ok:
        raise RuntimeError(f"the warm-up request failed: {warm.error}")
    return client


def bench_http(
    base_url: str,
    args: argparse.Namespace,
    workload: Workload,
    flush: bool = True,
    force_close: bool = False,
) -> RunMetrics:
    """Warm up, flush the cache (a radixlm or SGLang server), run the workload; the metrics."""

    async def go() -> tuple[list[RequestResult], float]:
        async with _session(force_close) as session:
            client = await connect(session, base_url, args, workload.warmup)
            if flush:
                flush_cache(base_url)
            run = run_conversations if workload.conversations else run_load
            return await run(
                client.send,
                workload.conversations or workload.requests,  # type: ignore[arg-type]
                args.request_rate,
                args.max_concurrency,
                args.seed,
            )

    results, duration = asyncio.run(go())
    return RunMetrics.of(results, duration)


# ---- the server and the in-process engine ----------------------------------------------------


@contextmanager
def launched_server(args: argparse.Namespace) -> Iterator[str]:
    """`radixlm serve` on a free port (or the server at --base-url); yields its URL."""
    if args.base_url:
        yield args.base_url.rstrip("/")
        return
    flags = []
    if args.model_path:
        flags += ["--model-path", args.model_path]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.max_total_tokens:
        flags += ["--max-total-tokens", str(args.max_total_tokens)]
    if args.disable_radix_cache:
        flags.append("--disable-radix-cache")
    flags += shlex.split(args.server_args)
    # Started by the main thread, so it goes when the benchmark does, however that ends.
    server = ServerProcess.start(flags, timeout=SERVER_START_TIMEOUT_S, die_with_parent=True)
    try:
        with server:
            print(
                f"server: radixlm serve {' '.join(flags)} -> {server.url} (log {server.log_path})"
            )
            yield server.url
    except BaseException:
        print(f"the server's log is kept in {server.log_path}", file=sys.stderr)
        raise
    server.log_path.unlink()


LLAMA_HOME = Path(os.environ.get("LLAMA_HOME", Path.home() / ".cache" / "llama-server"))


@contextmanager
def launched_llama_server(weights: str, threads: int) -> Iterator[str]:
    """llama.cpp's llama-server on the default model's `weights` (F32 or BF16) GGUF, as
    ../shared/tools/build-llama-server.sh builds it: 32 slots of 2,048 tokens, its default
    continuous batching and prompt caches; yields its URL."""
    binary = LLAMA_HOME / "bin" / "llama-server"
    gguf = LLAMA_HOME / f"SmolLM2-135M-Instruct.{weights}.gguf"
    if not (binary.exists() and gguf.exists()):
        raise SystemExit(
            f"no {binary} / {gguf}: build them once with bash ../shared/tools/build-llama-server.sh"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", "32", "-c", "65536", "-t", str(threads), "--metrics"]
    log = LLAMA_HOME / "bench-llama-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=kill_when_parent_exits
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}); its log: {log}")
            try:
                http_json(url + "/health", timeout=2)
                break
            except OSError:  # not listening yet, or 503 while it loads
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not healthy; its log: {log}") from None
                time.sleep(0.5)
        print(f"peer: {' '.join(cmd)} -> {url} (log {log})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_engine(engine: Engine, args: argparse.Namespace, workload: Workload) -> RunMetrics:
    """The same workload through the in-process Engine: warm up, flush, run.

    At request rate inf without a concurrency cap every prompt goes in one batch call (the
    engine's fastest path; no per-request latencies then); otherwise one thread per request in
    flight, sent on the same Poisson schedule as the HTTP run."""
    engine.generate(workload.warmup.text, {"max_new_tokens": workload.warmup.output_len})
    engine.flush_cache()
    requests = workload.requests
    params = [
        {"max_new_tokens": r.output_len, "temperature": 0.0, "ignore_eos": True} for r in requests
    ]
    prompts: dict[str, Any] = (
        {"input_ids": [r.input_ids for r in requests]}
        if args.token_ids
        else {"prompt": [r.text for r in requests]}
    )
    if math.isinf(args.request_rate) and args.max_concurrency is None:
        t0 = time.perf_counter()
        outs = engine.generate(sampling_params=params, **prompts)
        duration = time.perf_counter() - t0
        assert isinstance(outs, list)
        results = [_engine_result(o, math.nan) for o in outs]
        return RunMetrics.of(results, duration)

    def one(i: int) -> RequestResult:
        t = time.perf_counter()
        single = {k: v[i] for k, v in prompts.items()}
        out = engine.generate(sampling_params=params[i], **single)
        assert isinstance(out, dict)
        return _engine_result(out, time.perf_counter() - t)

    times = arrival_times(len(requests), args.request_rate, args.seed)
    with (
        ThreadPoolExecutor(args.max_concurrency or len(requests)) as pool,
        progress(len(requests), "in-process", "req") as bar,
    ):
        t0 = time.perf_counter()
        futures = []
        for i, at in enumerate(times):
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            futures.append(pool.submit(one, i))
        for _ in as_completed(futures):
            bar.update()
        results = [f.result() for f in futures]
        duration = time.perf_counter() - t0
    return RunMetrics.of(results, duration)


def _engine_result(out: dict[str, Any], latency: float) -> RequestResult:
    meta = out["meta_info"]
    return RequestResult(
        ok=True,
        latency=latency,
        prompt_tokens=meta["prompt_tokens"],
        completion_tokens=meta["completion_tokens"],
        cached_tokens=meta["cached_tokens"],
    )


# ---- modes -----------------------------------------------------------------------------------


def build_workload(
    args: argparse.Namespace, tokenizer: Tokenizer, shuffle: bool = True, seed: int | None = None
) -> Workload:
    """The requests of --dataset-name (unshuffled: in group order), from --seed or `seed`."""
    seed = args.seed if seed is None else seed
    maker = PromptMaker(tokenizer, seed)
    warmup_text = maker.text(16)
    warmup = BenchRequest(warmup_text, tokenizer.encode(warmup_text), 2, -1)
    if args.dataset_name == "multiturn":
        if args.token_ids:
            raise SystemExit("multiturn sends text: its prompts hold the answers of earlier turns")
        conversations = multiturn(
            maker, args.mt_conversations, args.mt_turns, args.mt_question_len, args.mt_output_len
        )
        return Workload([], warmup, conversations)
    if args.dataset_name == "random":
        requests = random_prompts(
            maker, args.num_prompts, args.random_input_len, args.random_output_len
        )
    elif args.dataset_name == "prefill":
        requests = random_prompts(maker, args.prefill_prompts, args.prefill_len, 1)
    else:
        requests = generated_shared_prefix(
            maker,
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
            seed,
            shuffle,
        )
    return Workload(requests, warmup)


def describe(args: argparse.Namespace, workload: Workload) -> dict[str, object]:
    """The setup lines of a summary block."""
    if args.dataset_name == "multiturn":
        data = (
            f"multiturn: {args.mt_conversations} conversations x {args.mt_turns} turns, "
            f"{args.mt_question_len}-token user messages"
        )
        out = args.mt_output_len
    elif args.dataset_name == "random":
        data = f"random: {args.num_prompts} prompts x {args.random_input_len} tokens"
        out = args.random_output_len
    elif args.dataset_name == "prefill":
        data = f"prefill: {args.prefill_prompts} prompts x {args.prefill_len} tokens, one at a time"
        out = 1
    else:
        data = (
            f"generated-shared-prefix: {args.gsp_num_groups} groups x "
            f"{args.gsp_prompts_per_group} prompts, system {args.gsp_system_prompt_len} + "
            f"question {args.gsp_question_len} tokens"
        )
        out = args.gsp_output_len
    api = "/v1/completions" if args.backend == "openai" else "/generate"
    lens = [len(r.input_ids) for r in workload.requests]
    return {
        "Backend": f"{args.backend} ({api}, streaming, {'token ids' if args.token_ids else 'text'})",
        "Dataset": f"{data}, {out} output tokens (ignore_eos)",
        "Mean prompt tokens": round(sum(lens) / len(lens), 1) if lens else "grows turn by turn",
        "Request rate (req/s)": args.request_rate,
        "Max concurrency": args.max_concurrency or "not set",
    }


def mode_serve(args: argparse.Namespace, url: str, tokenizer: Tokenizer) -> None:
    """One run of the workload against the server."""
    workload = build_workload(args, tokenizer)
    m = bench_http(url, args, workload)
    print_metrics("Serving Benchmark Result", describe(args, workload), m)


def mode_compare_engine(args: argparse.Namespace, url: str, tokenizer: Tokenizer) -> None:
    """The same workload served over HTTP and through the in-process Engine, alternating (the
    engine idles while the server runs and the other way round)."""
    import radixlm

    workload = build_workload(args, tokenizer)
    setup = describe(args, workload)
    info = http_json(url + "/server_info")
    # The server's model and scheduler sizes, so that both admit, chunk and evict alike.
    engine = radixlm.Engine(
        info["model_path"],
        max_total_tokens=info["max_total_num_tokens"],
        chunked_prefill_size=info["chunked_prefill_size"],
        max_running_requests=info["max_running_requests"],
        disable_radix_cache=info["disable_radix_cache"],
    )
    served: list[RunMetrics] = []
    inproc: list[RunMetrics] = []
    try:
        import torch

        setup["Torch threads (in-process)"] = torch.get_num_threads()
        with progress(args.rounds, "rounds (served, then in-process)", "round") as bar:
            for r in range(args.rounds):
                served.append(bench_http(url, args, workload))
                inproc.append(bench_engine(engine, args, workload))
                bar.write(
                    f"round {r + 1}/{args.rounds}: served {served[-1].duration:.2f}s, "
                    f"in-process {inproc[-1].duration:.2f}s, "
                    f"served / in-process {inproc[-1].duration / served[-1].duration:.3f}"
                )
                bar.update()
    finally:
        engine.shutdown()
    best_s = min(served, key=lambda m: m.duration)
    best_e = min(inproc, key=lambda m: m.duration)
    print_metrics("Served (best round)", setup, best_s)
    print_metrics("In-process Engine (best round)", {}, best_e)
    ratio = best_s.request_throughput / best_e.request_throughput
    ratios = [e.duration / s.duration for s, e in zip(served, inproc, strict=True)]
    _row("Served / in-process throughput (best):", f"{ratio:.3f}  (target >= 0.90)")
    _row("Served / in-process, median of rounds:", f"{float(np.median(ratios)):.3f}")
    print("=" * 60)


def mode_ttft_cached(args: argparse.Namespace, url: str, tokenizer: Tokenizer) -> None:
    """One request at a time, group by group after a cache flush: the first request of each
    group finds its system prompt uncached, the others cached."""
    if args.dataset_name != "generated-shared-prefix" or args.gsp_prompts_per_group < 2:
        raise SystemExit("--ttft-cached needs generated-shared-prefix, >= 2 prompts per group")
    workload = build_workload(args, tokenizer, shuffle=False)

    async def go() -> tuple[list[RequestResult], float]:
        async with _session() as session:
            client = await connect(session, url, args, workload.warmup)
            results = []
            with progress(len(workload.requests), "one at a time", "req") as bar:
                t0 = time.perf_counter()
                for req, is_first in zip(workload.requests, first, strict=True):
                    if is_first:
                        flush_cache(url)
                    results.append(await client.send(req))
                    bar.update()
                return results, time.perf_counter() - t0

    reqs = workload.requests
    first = [i == 0 or r.group != reqs[i - 1].group for i, r in enumerate(reqs)]
    results, duration = asyncio.run(go())
    uncached = [r for r, f in zip(results, first, strict=True) if f]
    cached = [r for r, f in zip(results, first, strict=True) if not f]
    for name, rs in (("uncached", uncached), ("cached", cached)):
        bad = [r.error for r in rs if not r.ok]
        if bad:
            raise SystemExit(f"{len(bad)} {name} requests failed; first: {bad[0]}")
    u = float(np.median([r.ttft for r in uncached]))
    c = float(np.median([r.ttft for r in cached]))
    setup = describe(args, workload)
    setup["Request rate (req/s)"] = "one at a time, cache flushed before each group"
    del setup["Max concurrency"]
    print_metrics("TTFT, cached vs uncached prefix", setup, RunMetrics.of(results, duration))
    for name, rs, p50 in (("uncached", uncached, u), ("cached", cached, c)):
        mean_cached = sum(r.cached_tokens for r in rs) / len(rs)
        _row(
            f"TTFT p50 {name} (ms):",
            f"{p50 * 1000:.1f}  ({len(rs)} requests, {mean_cached:.0f} cached tokens on average)",
        )
    _row("TTFT p50 cached / uncached:", f"{c / u:.3f}  (target <= 0.25)")
    print("=" * 60)


def mode_peer(args: argparse.Namespace, url: str, peer_url: str, tokenizer: Tokenizer) -> None:
    """Each dataset of --datasets against radixlm and the peer, over the same OpenAI API with
    the same text prompts; the two take turns, round by round (fresh prompts each round and
    each dataset, so that neither finds another round's or dataset's prefixes: only radixlm's
    cache is flushed between runs), and each keeps its best round."""
    peer = args.peer_name
    rows: list[tuple[str, RunMetrics, RunMetrics]] = []
    for i, dataset in enumerate(args.datasets):
        d = pace(argparse.Namespace(**{**vars(args), "dataset_name": dataset, "backend": "openai"}))
        best: dict[str, RunMetrics] = {}
        with progress(2 * args.rounds, f"{dataset}: radixlm and {peer}", "run") as bar:
            for r in range(args.rounds):
                workload = build_workload(d, tokenizer, seed=args.seed + r + 1000 * i)
                order = [("radixlm", url), (peer, peer_url)]
                for name, base in order if r % 2 == 0 else order[::-1]:
                    # Both sides alike: a connection per request (see _session).
                    m = bench_http(base, d, workload, name == "radixlm", force_close=True)
                    if m.failed:
                        raise SystemExit(f"{name}: {m.failed} requests failed: {m.first_error}")
                    bar.write(
                        f"  {dataset} round {r + 1} {name}: {m.duration:.2f}s, "
                        f"{m.request_throughput:.2f} req/s, TTFT p50 {m.ttft_ms[1]:.0f} ms"
                    )
                    if name not in best or m.duration < best[name].duration:
                        best[name] = m
                    bar.update()
        print_metrics(f"{dataset}: radixlm (best round)", describe(d, workload), best["radixlm"])
        print_metrics(f"{dataset}: {peer} (best round)", {}, best[peer])
        rows.append((dataset, best["radixlm"], best[peer]))
    print(f"{f' radixlm / {peer}, best rounds ':=^60}")
    print(f"{'dataset':<26}{'req/s ratio':>12}{'TTFT p50 ms':>20}{'TTFT p99 ms':>20}")
    for dataset, ours, theirs in rows:
        ratio = ours.request_throughput / theirs.request_throughput
        p50 = f"{ours.ttft_ms[1]:.0f} / {theirs.ttft_ms[1]:.0f}"
        p99 = f"{ours.ttft_ms[2]:.0f} / {theirs.ttft_ms[2]:.0f}"
        print(f"{dataset:<26}{ratio:>11.2f}x{p50:>20}{p99:>20}")
    for dataset, ours, theirs in rows:
        if dataset == "prefill":
            # One request at a time, one output token: the prompt tokens over the TTFTs.
            rates = [args.prefill_len * 1000 / m.ttft_ms[1] for m in (ours, theirs)]
            print(
                f"single-request prefill, {args.prefill_len} tokens (TTFT p50): radixlm "
                f"{rates[0]:.0f} tok/s, {peer} {rates[1]:.0f} tok/s, ratio {rates[0] / rates[1]:.2f}x"
            )
    print("=" * 60)
    if args.plot:
        names = [d for d, _, _ in rows]
        bar_charts(
            args.plot,
            f"serving_vs_{re.sub(r'[^a-z0-9]+', '_', peer.lower())}",
            f"radixlm vs {peer}: same datasets, OpenAI /v1/completions, streaming "
            f"(best of {args.rounds} alternating rounds)",
            names,
            [
                (
                    "requests/s",
                    {
                        "radixlm": [o.request_throughput for _, o, _ in rows],
                        peer: [t.request_throughput for _, _, t in rows],
                    },
                ),
                (
                    "TTFT p50, ms (log)",
                    {
                        "radixlm": [o.ttft_ms[1] for _, o, _ in rows],
                        peer: [t.ttft_ms[1] for *_, t in rows],
                    },
                ),
                (
                    "TTFT p99, ms (log)",
                    {
                        "radixlm": [o.ttft_ms[2] for _, o, _ in rows],
                        peer: [t.ttft_ms[2] for *_, t in rows],
                    },
                ),
            ],
            log_panels=(1, 2),
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--compare-engine",
        action="store_true",
        help="also run the workload through the in-process Engine; print served / in-process",
    )
    mode.add_argument(
        "--ttft-cached",
        action="store_true",
        help="TTFT p50 of requests whose system prompt is cached vs uncached, one at a time",
    )
    mode.add_argument(
        "--peer-url",
        help="also run --datasets against this OpenAI-compatible server, alternating; ratios",
    )
    mode.add_argument(
        "--peer-llama-server",
        choices=["F32", "BF16"],
        help="--peer-url, started here: llama-server on the default model's F32 or BF16 GGUF "
        "(built by ../shared/tools/build-llama-server.sh into $LLAMA_HOME)",
    )
    p.add_argument(
        "--datasets",
        type=lambda v: v.split(","),
        default=["generated-shared-prefix", "random", "multiturn"],
        help="peer mode: the datasets to run, comma-separated",
    )
    p.add_argument("--base-url", help="a running server (default: start `radixlm serve`)")
    p.add_argument(
        "--backend",
        choices=["sglang", "openai"],
        default="sglang",
        help="sglang: native /generate; openai: /v1/completions",
    )
    p.add_argument(
        "--model-path", help="model of the started server (default: the embedded SmolLM2-135M)"
    )
    p.add_argument("--max-total-tokens", type=int, help="KV pool size of the started server")
    p.add_argument("--dtype", help="weight dtype of the started server (e.g. bfloat16)")
    p.add_argument(
        "--disable-radix-cache", action="store_true", help="start the server without prefix cache"
    )
    p.add_argument(
        "--server-args",
        default="",
        help="more flags of the started server, e.g. '--target-itl-ms 500' (the served side only)",
    )
    p.add_argument(
        "--token-ids", action="store_true", help="send token ids instead of text (no tokenizing)"
    )
    p.add_argument(
        "--dataset-name",
        choices=["generated-shared-prefix", "random", "multiturn", "prefill"],
        default="generated-shared-prefix",
    )
    p.add_argument("--gsp-num-groups", type=int, default=4, help="distinct system prompts")
    p.add_argument(
        "--gsp-prompts-per-group", type=int, default=8, help="questions per system prompt"
    )
    p.add_argument("--gsp-system-prompt-len", type=int, default=1200, help="tokens")
    p.add_argument("--gsp-question-len", type=int, default=60, help="tokens")
    p.add_argument("--gsp-output-len", type=int, default=8, help="tokens generated per request")
    p.add_argument("--num-prompts", type=int, default=32, help="random dataset: prompts")
    p.add_argument("--random-input-len", type=int, default=512, help="random dataset: tokens")
    p.add_argument("--random-output-len", type=int, default=16, help="random dataset: tokens")
    p.add_argument("--prefill-prompts", type=int, default=4, help="prefill dataset: prompts")
    p.add_argument("--prefill-len", type=int, default=1024, help="prefill dataset: tokens")
    p.add_argument("--mt-conversations", type=int, default=16, help="multiturn: conversations")
    p.add_argument("--mt-turns", type=int, default=4, help="multiturn: user turns each")
    p.add_argument("--mt-question-len", type=int, default=128, help="multiturn: tokens a message")
    p.add_argument("--mt-output-len", type=int, default=32, help="multiturn: tokens an answer")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (inf: all at once)",
    )
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    p.add_argument(
        "--rounds", type=int, default=2, help="--compare-engine, peer: alternating rounds"
    )
    p.add_argument("--seed", type=int, default=1, help="prompts and arrival times")
    add_plot_arg(p)
    args = p.parse_args(argv)
    args.peer_name = "llama-server" if args.peer_llama_server else "peer"
    return pace(args)


def pace(args: argparse.Namespace) -> argparse.Namespace:
    """args with the request pacing its dataset needs: the prefill dataset's prompts go one at a
    time, all sent as soon as the one before is answered (its TTFT is then prefill alone)."""
    if args.dataset_name == "prefill":
        args.max_concurrency, args.request_rate = 1, math.inf
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the mode the flags ask for."""
    args = parse_args(argv)
    print(f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with launched_server(args) as url:
        # The server's tokenizer, so that text prompts have the intended token counts.
        tokenizer = Tokenizer.load(http_json(url + "/model_info")["tokenizer_path"])
        if args.peer_llama_server:
            with launched_llama_server(args.peer_llama_server, os.cpu_count() or 1) as peer:
                mode_peer(args, url, peer, tokenizer)
        elif args.peer_url:
            mode_peer(args, url, args.peer_url.rstrip("/"), tokenizer)
        elif args.compare_engine:
            mode_compare_engine(args, url, tokenizer)
        elif args.ttft_cached:
            mode_ttft_cached(args, url, tokenizer)
        else:
            mode_serve(args, url, tokenizer)


if __name__ == "__main__":
    main()
