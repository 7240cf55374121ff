"""A seeded random load against a server, and the checks every chaos scenario ends with.

A scenario plans `Call`s, each with the fate the test chooses for it (complete, fail with a named
error, be aborted through /abort_request, or be left by its client), runs them concurrently
with `run_round`, and then checks that each ended as its fate allows (`check_results`) and that
the server is back where it started (`check_recovered`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema

# tests/ is on sys.path (its conftest's folder), so the server tests' harness is importable as
# a namespace package; tests/server keeps it, used here as it is.
from server.server_harness import ServerProcess, metric, parse_metrics

from radixlm.core.messages import AbortRequest

GENERATE = "/generate"
CHAT = "/v1/chat/completions"
# A call with no answer for this long has hung (longer than the server's own 60 s wait for a
# control call, so that one of those answers 503 first).
CALL_TIMEOUT_S = 90.0
ROUND_TIMEOUT_S = 180.0
IDLE_TIMEOUT_S = 30.0
CLIENT_ABORT = AbortRequest("").message  # what an abort through /abort_request says


class Fate(enum.Enum):
    """What the test does to a call, and so which ends it allows."""

    COMPLETE = "complete"  # must end normally (stop or length): never aborted
    FAIL = "fail"  # must end with a clear error naming `Call.error`
    # Aborted through /abort_request `Call.after` seconds after it was sent; it ends with that
    # abort, or normally if it finished first.
    ABORT = "abort"
    # Its client disconnects after `Call.after` events (a stream) or seconds; it may also have
    # ended normally first.
    LEAVE = "leave"
    # Ends normally, or fails as a whole with an error naming `Call.error` (a stream in flight
    # when the engine is killed).
    MAY_FAIL = "may fail"


@dataclass
class Call:
    """One planned request."""

    name: str
    route: str  # GENERATE or CHAT
    body: dict[str, Any]
    fate: Fate = Fate.COMPLETE
    after: float = 0.0  # ABORT: seconds; LEAVE: events read (a stream) or seconds waited
    delay: float = 0.0  # seconds to wait before sending it
    error: str = ""  # FAIL: a part of the error message
    check: Callable[[Output], object] | None = None  # raises if a normal end is wrong

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def params(self) -> dict[str, Any]:
        """The sampling fields (/generate's sampling_params, or the OpenAI body itself)."""
        params: dict[str, Any] = self.body.get("sampling_params", self.body)
        return params

    @property
    def max_new(self) -> int:
        return int(self.params["max_new_tokens" if self.route == GENERATE else "max_tokens"])

    @property
    def num_outputs(self) -> int:
        """Outputs in the answer: one per prompt of a batch and sample (n)."""
        text = self.body.get("text")
        return (len(text) if isinstance(text, list) else 1) * int(self.params.get("n", 1))

    @property
    def may_stop_early(self) -> bool:
        """Whether a normal end may come before max_new tokens."""
        p = self.params
        grammar = any(k in p for k in ("regex", "json_schema", "ebnf", "response_format"))
        return grammar or not p.get("ignore_eos") or bool(p.get("stop"))


@dataclass
class Output:
    """One output of a call (a call has several with a batch or n > 1)."""

    finish: str | None = None  # "stop", "length" or "abort"; None if no end was seen
    message: str = ""  # an abort's message
    text: str = ""
    tokens: int | None = None  # output tokens, where the answer says


@dataclass
class Result:
    """How a call ended, as its client saw it."""

    call: Call
    status: int | None = None  # HTTP status (an error event's, in a stream); None if it left first
    error: str = ""  # the error's message, when the call failed as a whole
    outputs: dict[int, Output] = field(default_factory=dict)
    usage_tokens: int | None = None  # the OpenAI routes' completion_tokens, all outputs together
    left: bool = False  # the client disconnected before the end

    @property
    def tokens(self) -> int | None:
        """Output tokens of every output together, where the answer says."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        counts = [o.tokens for o in self.outputs.values()]
        return None if None in counts else sum(c for c in counts if c is not None)

    def take_usage(self, completion_tokens: int) -> None:
        """The OpenAI routes' usage: the output's own count when there is one output."""
        self.usage_tokens = completion_tokens
        if len(self.outputs) == 1:
            self.outputs[0].tokens = completion_tokens

    @property
    def aborted_by_client(self) -> bool:
        """Whether every output ended with the test's own abort."""
        outs = self.outputs.values()
        return bool(outs) and all(o.finish == "abort" and o.message == CLIENT_ABORT for o in outs)

    def output(self, index: int) -> Output:
        return self.outputs.setdefault(index, Output())

    def describe(self) -> str:
        c = self.call
        outs = ", ".join(
            f"#{i} {o.finish} {o.tokens}/{c.max_new} {o.message!r}"
            for i, o in sorted(self.outputs.items())
        )
        kind = f"{c.route}{' stream' if c.stream else ''}, {c.fate.value}"
        return f"{c.name} [{kind}]: status {self.status} {self.error!r}, outputs: {outs}"


# ---- running a round ----------------------------------------------------------------------------


async def run_round(
    server: ServerProcess, calls: list[Call], rng: random.Random, engine_may_die: bool = False
) -> list[Result]:
    """Send every call at once; each ends as its fate says (or as the server decides). Control
    calls probe the server meanwhile: the slot invariant must hold between any two steps (and,
    if `engine_may_die`, they may get a 503 while no engine runs)."""
    async with server.async_client(timeout=CALL_TIMEOUT_S) as client:
        done = asyncio.Event()
        prober = asyncio.create_task(_probe(client, rng, done, engine_may_die))
        jobs = [_run(client, c) for c in calls]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*jobs), ROUND_TIMEOUT_S))
        finally:
            done.set()
            await prober


async def _probe(
    client: httpx.AsyncClient, rng: random.Random, done: asyncio.Event, engine_may_die: bool
) -> None:
    """Control calls at random moments until done: none may fail, whatever runs."""
    while not done.is_set():
        kind = rng.choice(["invariant", "metrics", "server_info", "flush", "stray_abort"])
        try:
            await _probe_once(client, kind, engine_may_die)
        except httpx.TimeoutException as e:
            raise AssertionError(f"{kind}: no answer within {CALL_TIMEOUT_S:.0f} s") from e
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), rng.uniform(0.01, 0.1))


async def _probe_once(client: httpx.AsyncClient, kind: str, engine_may_die: bool) -> None:
    if kind == "invariant":
        r = await client.get("/internal/check_invariant")
        if engine_may_die and r.status_code == 503:
            assert "engine" in r.json()["error"]["message"], r.text
            return
        assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    elif kind == "metrics":
        r = await client.get("/metrics")
        assert r.status_code == 200, r.text
        parse_metrics(r.text)
    elif kind == "server_info":
        r = await client.get("/server_info")
        assert r.status_code == 200 and r.json()["internal_states"][0], r.text
    elif kind == "flush":  # refused while requests run, and harmless when it is not
        r = await client.post("/flush_cache")
        if engine_may_die and r.status_code == 503:
            return
        assert r.status_code == 200 or "cannot flush" in r.json()["error"]["message"], r.text
    else:
        r = await client.post("/abort_request", json={"rid": "no-such-request"})
        assert r.status_code == 200 and r.json() == {"aborted": 0}, r.text


async def _run(client: httpx.AsyncClient, call: Call) -> Result:
    await asyncio.sleep(call.delay)
    result = Result(call)
    aborter = None
    if call.fate is Fate.ABORT:
        aborter = asyncio.create_task(_abort_later(client, call))
    try:
        if call.stream:
            await _stream(client, call, result)
        elif call.fate is Fate.LEAVE:
            try:
                r = await client.post(call.route, json=call.body, timeout=call.after)
                _answer(r, result)
            except httpx.TimeoutException:
                result.left = True
        else:
            _answer(await client.post(call.route, json=call.body), result)
    except httpx.TimeoutException as e:  # reported with the call it hung, by check_results
        result.error = f"no answer within {CALL_TIMEOUT_S:.0f} s: {e!r}"
    finally:
        if aborter is not None:
            await aborter
    return result


async def _abort_later(client: httpx.AsyncClient, call: Call) -> None:
    await asyncio.sleep(call.after)
    r = await client.post("/abort_request", json={"rid": call.body["rid"]})
    assert r.status_code == 200 and r.json()["aborted"] in (0, 1), r.text


def _answer(r: httpx.Response, result: Result) -> None:
    """A whole (not streamed) answer."""
    result.status = r.status_code
    body = r.json()
    if r.status_code != 200:
        result.error = body["error"]["message"]
    elif result.call.route == GENERATE:
        for i, out in enumerate(body if isinstance(body, list) else [body]):
            _take_generate(out, result.output(i))
    else:
        for choice in body["choices"]:
            out = result.output(choice["index"])
            out.finish, out.text = choice["finish_reason"], choice["message"]["content"]
        result.take_usage(body["usage"]["completion_tokens"])


def _take_generate(event: dict[str, Any], out: Output) -> None:
    assert event["text"].startswith(out.text), "a stream's text is cumulative"
    reason = event["meta_info"]["finish_reason"]
    out.text, out.tokens = event["text"], len(event["output_ids"])
    if reason is not None:
        out.finish, out.message = reason["type"], reason.get("message", "")


async def _stream(client: httpx.AsyncClient, call: Call, result: Result) -> None:
    body = call.body
    if call.route == CHAT:
        body = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", call.route, json=body) as r:
        result.status = r.status_code
        if r.status_code != 200:
            result.error = json.loads(await r.aread())["error"]["message"]
            return
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            event = json.loads(line[6:])
            events += 1
            if "error" in event:
                result.status, result.error = event["error"]["code"], event["error"]["message"]
            elif call.route == GENERATE:
                _take_generate(event, result.output(event.get("index", 0)))
            elif event["choices"]:
                choice = event["choices"][0]
                out = result.output(choice["index"])
                out.text += choice["delta"].get("content") or ""
                out.finish = choice["finish_reason"] or out.finish
            else:
                result.take_usage(event["usage"]["completion_tokens"])
            if call.fate is Fate.LEAVE and events >= call.after:
                result.left = True
                return  # leaving the block closes the connection mid-stream
        raise AssertionError(f"{call.name}: the stream ended without [DONE]")


# ---- checks -------------------------------------------------------------------------------------


def check_results(results: list[Result], seed: int | str) -> None:
    """Every call ended as its fate allows: a COMPLETE call was never aborted."""
    problems = [f"{r.describe()}: {why}" for r in results if (why := _problem(r)) is not None]
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)


def _problem(r: Result) -> str | None:
    c = r.call
    if c.fate is Fate.FAIL:
        messages = [r.error] + [o.message for o in r.outputs.values() if o.finish == "abort"]
        if not any(c.error in m for m in messages if m):
            return f"should have failed with an error naming {c.error!r}"
        return None
    if c.fate is Fate.LEAVE and r.left:
        return None
    if c.fate is Fate.MAY_FAIL and r.error and c.error in r.error:
        return None
    if r.status != 200 or r.error:
        return "failed"
    if sorted(r.outputs) != list(range(c.num_outputs)):
        return f"expected {c.num_outputs} outputs"
    for out in r.outputs.values():
        if c.fate is Fate.ABORT and out.finish == "abort" and out.message == CLIENT_ABORT:
            continue
        if out.finish not in ("stop", "length"):
            return "wrongly aborted, or no end"
        if out.finish == "length" and out.tokens not in (None, c.max_new):
            return "ended for length at the wrong length"
        if out.finish == "stop" and not c.may_stop_early:
            return "stopped early despite ignore_eos"
        if c.check is not None:
            try:
                c.check(out)
            except Exception as e:
                return f"wrong output {out.text!r}: {e!r}"
    return None


def valid_json(schema: dict[str, Any]) -> Callable[[Output], None]:
    """A check that a complete output (a stop) is a JSON value of schema; one cut at its
    max_new_tokens (a length) is only the start of one."""

    def check(out: Output) -> None:
        if out.finish == "stop":
            jsonschema.validate(json.loads(out.text), schema)

    return check


def matches(pattern: str) -> Callable[[Output], None]:
    """A check that a complete output (a stop) matches pattern."""

    def check(out: Output) -> None:
        if out.finish == "stop":
            assert re.fullmatch(pattern, out.text), pattern

    return check


def engine_stats(http: httpx.Client) -> dict[str, Any]:
    """The engine's counters (/server_info's internal state)."""
    stats: dict[str, Any] = http.get("/server_info").json()["internal_states"][0]
    return stats


def drafts_accepted(http: httpx.Client) -> int | None:
    """Draft tokens the server's engine has accepted, over every draft source; None when it
    does not speculate."""
    info = http.get("/server_info").json()
    if info["speculative_algorithm"] is None:
        return None
    return sum(c["accepted"] for c in info["internal_states"][0]["spec"].values())


def generated_tokens(http: httpx.Client) -> int:
    """Tokens the engine generated so far, for every request (left or aborted ones too)."""
    return int(metric(parse_metrics(http.get("/metrics").text), "sglang:generation_tokens_total"))


def wait_idle(http: httpx.Client) -> None:
    """Wait until the engine holds no request."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while (s := engine_stats(http))["num_running_reqs"] + s["num_queue_reqs"]:
        assert time.monotonic() < deadline, f"requests are still running after the round: {s}"
        time.sleep(0.05)


def check_recovered(http: httpx.Client, pool: int) -> None:
    """After a round: nothing runs, every slot has one owner, the flushed cache leaves the whole
    pool free, and the server still serves a plain request."""
    wait_idle(http)
    samples = parse_metrics(http.get("/metrics").text)
    assert metric(samples, "sglang:num_running_reqs") == 0
    assert metric(samples, "sglang:num_queue_reqs") == 0
    assert http.get("/internal/check_invariant").json() == {"ok": True}
    r = http.post("/flush_cache")  # refused while the frontend still tracks any request
    assert r.status_code == 200, r.text
    stats = engine_stats(http)
    assert stats["max_total_num_tokens"] == pool
    assert stats["num_used_tokens"] == 0 and stats["cached_tree_tokens"] == 0, stats
    r = http.post(GENERATE, json={"text": "still here", "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 4, r.text


def rss_kib(pid: int) -> int:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def check_rss_flat(samples: list[int], warmup: int, tolerance_kib: int, what: str) -> None:
    """Resident memory measured after each round stops growing once `warmup` rounds are done:
    the lesser of the last two samples is within tolerance of the greatest warm-up sample (so
    that one round's transient peak or trough is not taken for growth)."""
    grown = min(samples[-2:]) - max(samples[:warmup])
    assert grown <= tolerance_kib, f"{what} grew {grown} KiB after warm-up: {samples}"
