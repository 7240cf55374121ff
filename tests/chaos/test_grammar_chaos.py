"""Grammars that fail, mid-batch: requests whose regex, JSON schema or EBNF the frontend
rejects, one that only the engine's compile rejects, one no output can match, and one that
compiles but makes every step slow, sent while valid requests (with and without grammars) run.
The bad ones end with an error naming the problem; every other request completes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chaos_grammars import BAD_GRAMMARS, SLOW_EBNF, SMALL_SCHEMA
from chaos_harness import (
    CHAT,
    GENERATE,
    Call,
    Fate,
    Output,
    check_recovered,
    check_results,
    matches,
    run_round,
    valid_json,
)
from server.server_harness import ServerProcess

pytestmark = pytest.mark.chaos

POOL = 512
ROUNDS = 2
DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
# min_new_tokens keeps the model from ending the slow grammar early.
SLOW_TOKENS = 80


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    srv = start_server("--max-total-tokens", str(POOL), "--chunked-prefill-size", "32")
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def body(
    route: str, name: str, max_new: int, stream: bool, seed: int, params: dict[str, Any]
) -> dict[str, Any]:
    """A request body; params are sampling params under /generate's names."""
    if route == GENERATE:
        params = {"max_new_tokens": max_new, "temperature": 1.0, "sampling_seed": seed, **params}
        return {
            "text": f"Request {name}:",
            "sampling_params": params,
            "stream": stream,
            "rid": name,
        }
    params = dict(params)
    if "min_new_tokens" in params:
        params["min_tokens"] = params.pop("min_new_tokens")
    if isinstance(params.get("json_schema"), str):
        with contextlib.suppress(json.JSONDecodeError):  # the OpenAI routes take the schema itself
            params["json_schema"] = json.loads(params["json_schema"])
    return {
        "messages": [{"role": "user", "content": f"Request {name}"}],
        "max_tokens": max_new,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
        **params,
    }


def only_a(out: Output) -> None:
    """The slow grammar's language, complete or not."""
    assert out.text and set(out.text) == {"a"}


def plan(rng: random.Random, tag: str) -> list[Call]:
    calls: list[Call] = []

    def add(kind: str, max_new: int, fate: Fate = Fate.COMPLETE, **params: Any) -> Call:
        name = f"{tag}-{kind}{len(calls)}"
        route = GENERATE if fate is Fate.ABORT else rng.choice([GENERATE, GENERATE, CHAT])
        stream, seed = rng.random() < 0.5, rng.randrange(1 << 30)
        calls.append(Call(name, route, body(route, name, max_new, stream, seed, params), fate))
        return calls[-1]

    # The batch the bad grammars land in.
    for _ in range(5):
        add("plain", rng.randint(60, 150))
    for _ in range(3):
        add("json", 60, json_schema=json.dumps(SMALL_SCHEMA)).check = valid_json(SMALL_SCHEMA)
    add("date", 20, regex=DATE).check = matches(DATE)
    # A fresh pattern: compiled on the engine's worker thread while the batch runs.
    fresh = "{0}( {0}){{0,5}}".format("".join(rng.choices("abcdefgh", k=6)))
    add("fresh", 40, regex=fresh).check = matches(fresh)
    add("forced", 20, regex="hello world").check = matches("hello world")
    slow = add("slow", SLOW_TOKENS, ebnf=SLOW_EBNF, min_new_tokens=SLOW_TOKENS)
    slow.check, slow.delay = only_a, rng.uniform(0, 0.2)
    # The bad ones, mid-batch, and requests aborted while their grammar may still compile.
    for grammar, error in BAD_GRAMMARS:
        bad = add("bad", 20, Fate.FAIL, **grammar)
        bad.error, bad.delay = error, rng.uniform(0.05, 0.4)
    for _ in range(2):
        regex = "".join(rng.choices("xyz", k=5)) + "[0-9]{1,3}"
        add("abort", 40, Fate.ABORT, regex=regex).after = rng.uniform(0, 0.05)
    return calls


def test_bad_grammars_fail_alone(server: ServerProcess, chaos_seed: Callable[[int], int]) -> None:
    seed = chaos_seed(31)
    with server.client() as http:
        for round_ in range(ROUNDS):
            tag = f"{seed}.{round_}"
            rng = random.Random(tag)
            results = asyncio.run(run_round(server, plan(rng, tag), rng))
            check_results(results, tag)
            check_recovered(http, POOL)
