"""Many concurrent streams on /generate and /v1/chat/completions, some aborted through
/abort_request and some left by their clients mid-stream or mid-wait, round after round."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chaos_harness import (
    CHAT,
    GENERATE,
    Call,
    Fate,
    Result,
    check_recovered,
    check_results,
    check_rss_flat,
    drafts_accepted,
    generated_tokens,
    rss_kib,
    run_round,
    wait_idle,
)
from server.server_harness import TINY_POOL, ServerProcess

pytestmark = pytest.mark.chaos

CALLS = 32
ROUNDS = 8
WARMUP_ROUNDS = 3
# Memory the server may still gain after the warm-up rounds without a leak. The HTTP process
# keeps the last 10 s of outputs for its throughput gauge (~100 bytes each, a few thousand a
# round: ~1.5 MiB until the window is full) and its allocator settles; a leak of 32 KiB a
# request (1 MiB a round) shows. The engine's RSS swings by ~10 MiB from round to round as
# torch's temporaries come and go; a leak of 256 KiB a request (8 MiB a round) shows.
SERVER_RSS_TOLERANCE_KIB = 4 * 1024
ENGINE_RSS_TOLERANCE_KIB = 32 * 1024
# Output asked of the requests the test aborts or leaves: far more than they can produce before
# the abort lands, so that a request the server failed to abort shows in the token count.
LONG = 2000
WORDS = ["the", "radix", "tree", "keeps", "every", "prefix", "requests", "share", "least", "used"]


@pytest.fixture(
    scope="module",
    params=[(), ("--speculative-algorithm", "both")],
    ids=["plain", "speculative"],
)
def server(
    start_server: Callable[..., ServerProcess], request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """The server, plain and with speculative decoding (drafts verified while streams are
    aborted and left: the same outcomes, no slot left behind)."""
    flags = ("--max-total-tokens", str(TINY_POOL), "--max-running-requests", "12")
    srv = start_server(*flags, *request.param)
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def plan(rng: random.Random, tag: str) -> list[Call]:
    calls = []
    for i in range(CALLS):
        name = f"{tag}-{i}"
        route = rng.choice([GENERATE, GENERATE, CHAT])
        fate = rng.choices([Fate.COMPLETE, Fate.ABORT, Fate.LEAVE], [6, 1.5, 1.5])[0]
        if fate is Fate.ABORT and route == CHAT:
            fate = Fate.LEAVE  # /abort_request needs a rid, which only /generate takes
        stream = rng.random() < 0.6
        # Now and then a prompt long enough to be tokenized off the event loop (and in LEAVE's
        # case, left while it is): ~8200 characters, ~1700 tokens.
        words = 1400 if fate is not Fate.ABORT and rng.random() < 0.1 else rng.randint(2, 60)
        text = " ".join(rng.choices(WORDS, k=words))
        params: dict[str, Any] = {"temperature": rng.choice([0.0, 0.8])}
        after = 0.0
        if fate is Fate.COMPLETE:
            params.update(max_new_tokens=rng.randint(0, 120), ignore_eos=rng.random() < 0.7)
            if rng.random() < 0.2:
                params["stop"] = [rng.choice(WORDS)]
        else:
            params.update(max_new_tokens=LONG, ignore_eos=True)
            leave_events = fate is Fate.LEAVE and stream
            after = rng.randint(1, 4) if leave_events else rng.uniform(0.05, 0.3)
        if route == GENERATE:
            prompt: str | list[str] = text
            if fate is not Fate.ABORT and rng.random() < 0.25:  # several outputs to one client
                if rng.random() < 0.5:
                    params["n"] = rng.randint(2, 3)
                else:
                    prompt = [text, *rng.choices(WORDS, k=rng.randint(1, 2))]
            body = {"text": prompt, "sampling_params": params, "stream": stream, "rid": name}
            if rng.random() < 0.2:
                body["return_logprob"] = True
        else:
            params["max_tokens"] = params.pop("max_new_tokens")
            if fate is Fate.COMPLETE and rng.random() < 0.2:
                params["n"] = 2
            messages = [{"role": "user", "content": text}]
            body = {"messages": messages, "stream": stream, **params}
        calls.append(Call(name, route, body, fate, after))
    return calls


def tokens_after_leaving(results: list[Result], generated: int) -> int:
    """Tokens generated for the requests whose clients left: all the others report theirs."""
    known = [r.tokens for r in results if r.call.fate is not Fate.LEAVE]
    assert all(n is not None for n in known)
    return generated - sum(n for n in known if n is not None)


def test_streams_with_aborts_and_disconnects(
    server: ServerProcess, chaos_seed: Callable[[int], int]
) -> None:
    seed = chaos_seed(11)
    rss: list[tuple[int, int]] = []
    engine_pid = server.engine_pid()
    with server.client() as http:
        for round_ in range(ROUNDS):
            tag = f"{seed}.{round_}"
            rng = random.Random(tag)
            calls = plan(rng, tag)
            before = generated_tokens(http)
            results = asyncio.run(run_round(server, calls, rng))
            check_results(results, tag)
            # Far from their end when the abort came: each must have ended with it.
            lost = [
                r.describe()
                for r in results
                if r.call.fate is Fate.ABORT and not r.aborted_by_client
            ]
            assert not lost, f"seed {tag}: an abort was lost: {lost}"
            wait_idle(http)
            left = tokens_after_leaving(results, generated_tokens(http) - before)
            assert left < LONG, f"seed {tag}: a request whose client left ran on ({left} tokens)"
            check_recovered(http, TINY_POOL)
            rss.append((rss_kib(server.proc.pid), rss_kib(engine_pid)))
            print(f"round {tag}: {left} tokens after leaving, rss {rss[-1]}")
        accepted = drafts_accepted(http)
        assert accepted is None or accepted > 0, "no draft was accepted: speculation did not run"
    check_rss_flat([r[0] for r in rss], WARMUP_ROUNDS, SERVER_RSS_TOLERANCE_KIB, "the server")
    check_rss_flat([r[1] for r in rss], WARMUP_ROUNDS, ENGINE_RSS_TOLERANCE_KIB, "the engine")


def test_abort_all_mid_load(server: ServerProcess, chaos_seed: Callable[[int], int]) -> None:
    """/abort_request with abort_all while long streams and waits run: every one of them ends
    with the abort (those that reached the server after it, with their own a moment later)."""
    seed = chaos_seed(12)
    rng = random.Random(seed)
    calls = []
    for i in range(16):
        name = f"all.{seed}-{i}"
        params = {"max_new_tokens": LONG, "ignore_eos": True}
        body = {"text": name, "sampling_params": params, "stream": rng.random() < 0.5, "rid": name}
        calls.append(Call(name, GENERATE, body, Fate.ABORT, after=1.0))

    async def abort_all_later() -> int:
        async with server.async_client() as client:
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            r = await client.post("/abort_request", json={"abort_all": True})
            return int(r.json()["aborted"])

    async def main() -> tuple[list[Result], int]:
        return await asyncio.gather(run_round(server, calls, rng), abort_all_later())

    results, count = asyncio.run(main())
    check_results(results, seed)
    assert all(r.aborted_by_client for r in results) and 0 < count <= len(calls), count
    with server.client() as http:
        check_recovered(http, TINY_POOL)
