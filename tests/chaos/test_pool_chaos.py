"""A KV pool far smaller than the load: chunked prefill, long prompts, and JSON-schema requests
whose forced tails (jump-forward) need several slots at once, so that running requests are
retracted again and again. Every request fits the pool alone, so none may be aborted but those
the test aborts or leaves.

The 64-slot server replays the scheduler's scenario 1 under load: A (10-token prompt, 50 output
tokens) decodes while B (60-token prompt) arrives and is admitted in 16-token chunks; B stalls
on its third chunk and A takes the last free slots."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chaos_grammars import NESTED_SCHEMA, SMALL_SCHEMA
from chaos_harness import (
    CHAT,
    GENERATE,
    Call,
    Fate,
    check_recovered,
    check_results,
    drafts_accepted,
    engine_stats,
    run_round,
    valid_json,
)
from server.server_harness import ServerProcess

pytestmark = pytest.mark.chaos

CHUNK = 16
ROUNDS = 3


@pytest.fixture(
    scope="module",
    params=[(64, ()), (320, ()), (320, ("--speculative-algorithm", "both"))],
    ids=["pool64", "pool320", "pool320-speculative"],
)
def pool_server(
    request: pytest.FixtureRequest, start_server: Callable[..., ServerProcess]
) -> Iterator[tuple[ServerProcess, int]]:
    """A server with a small pool; the last also drafts (drafts need slots of their own)."""
    pool, flags = request.param
    srv = start_server(
        "--max-total-tokens", str(pool), "--chunked-prefill-size", str(CHUNK), *flags
    )
    yield srv, pool
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49000) for _ in range(n)]


def generate(
    rng: random.Random, name: str, prompt: list[int], max_new: int, **params: Any
) -> dict[str, Any]:
    """A /generate body; every one streams or not at random."""
    params = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0.0, **params}
    return {
        "input_ids": prompt,
        "sampling_params": params,
        "stream": rng.random() < 0.5,
        "rid": name,
    }


def structured(rng: random.Random, name: str, prompt: list[int], schema: dict[str, Any]) -> Call:
    """A JSON-schema request, sampled (a random model writes arbitrary allowed values)."""
    params = {"temperature": 1.0, "sampling_seed": rng.randrange(1 << 30)}
    body = generate(rng, name, prompt, 100 if schema is NESTED_SCHEMA else 40, **params)
    body["sampling_params"]["json_schema"] = json.dumps(schema)
    return Call(name, GENERATE, body, check=valid_json(schema))


def scenario_one(rng: random.Random, tag: str) -> list[Call]:
    """Three A/B pairs as in the scheduler's scenario 1, and small requests around them."""
    calls = []
    for k in range(3):
        start = 0.15 * k
        a = generate(rng, f"{tag}-A{k}", ids(rng, 10), 50)
        a["stream"] = True
        b = generate(rng, f"{tag}-B{k}", ids(rng, 60), rng.randint(1, 4))
        calls.append(Call(f"{tag}-A{k}", GENERATE, a, delay=start))
        calls.append(Call(f"{tag}-B{k}", GENERATE, b, delay=start + rng.uniform(0.02, 0.08)))
    for i in range(4):  # long outputs: what running requests may still need outgrows the pool
        name = f"{tag}-g{i}"
        calls.append(Call(name, GENERATE, generate(rng, name, ids(rng, 4), rng.randint(40, 60))))
    for i in range(12):
        name = f"{tag}-s{i}"
        if rng.random() < 0.3:
            call = structured(rng, name, ids(rng, 6), SMALL_SCHEMA)
        else:
            n = rng.randint(4, 30)
            call = Call(name, GENERATE, generate(rng, name, ids(rng, n), rng.randint(1, 64 - n)))
        call.delay = rng.uniform(0, 0.4)
        calls.append(call)
    return calls


def few_hundred(rng: random.Random, tag: str, pool: int) -> list[Call]:
    """Long prompts, JSON schemas on both routes, plain streams, and a few aborts and leaves."""
    calls = []
    for i in range(6):
        n = rng.randint(150, 280)
        name = f"{tag}-long{i}"
        calls.append(
            Call(name, GENERATE, generate(rng, name, ids(rng, n), rng.randint(1, pool - n)))
        )
    for i in range(8):
        calls.append(structured(rng, f"{tag}-json{i}", ids(rng, rng.randint(8, 40)), NESTED_SCHEMA))
    for i in range(4):
        body = {
            "messages": [{"role": "user", "content": f"Describe order {i} as JSON."}],
            "max_tokens": 100,
            "temperature": 1.0,
            "seed": rng.randrange(1 << 30),
            "stream": rng.random() < 0.5,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "order", "schema": NESTED_SCHEMA},
            },
        }
        calls.append(Call(f"{tag}-chat{i}", CHAT, body, check=valid_json(NESTED_SCHEMA)))
    for i in range(8):
        name = f"{tag}-plain{i}"
        body = generate(rng, name, ids(rng, rng.randint(10, 60)), rng.randint(20, 150))
        calls.append(Call(name, GENERATE, body, delay=rng.uniform(0, 0.3)))
    for i in range(4):
        name = f"{tag}-leave{i}"
        body = generate(rng, name, ids(rng, 20), 200)
        body["stream"] = True
        calls.append(Call(name, GENERATE, body, Fate.LEAVE, after=rng.randint(1, 3)))
    for i in range(3):
        name = f"{tag}-abort{i}"
        body = generate(rng, name, ids(rng, 20), 250)
        calls.append(Call(name, GENERATE, body, Fate.ABORT, after=rng.uniform(0.05, 0.3)))
    return calls


def test_a_small_pool_retracts_and_aborts_nobody(
    pool_server: tuple[ServerProcess, int], chaos_seed: Callable[[int], int]
) -> None:
    server, pool = pool_server
    seed = chaos_seed(21)
    with server.client() as http:
        first = retractions = engine_stats(http)["num_retractions"]
        for round_ in range(ROUNDS):
            tag = f"{seed}.{pool}.{round_}"
            rng = random.Random(tag)
            calls = scenario_one(rng, tag) if pool == 64 else few_hundred(rng, tag, pool)
            results = asyncio.run(run_round(server, calls, rng))
            check_results(results, tag)
            check_recovered(http, pool)
            now = engine_stats(http)["num_retractions"]
            print(f"round {tag}: {now - retractions} retractions")
            retractions = now
        accepted = drafts_accepted(http)
    assert retractions > first, f"seed {seed}: the pool never ran short"
    assert accepted is None or accepted > 0, "no draft was accepted: speculation did not run"
