"""Chaos in the engine core, stepped by hand: between every two steps, random new requests,
aborts and control calls reach a core with a pool far smaller than its load; the slot invariant
is checked after every step, and every request's end is checked against what the test did to it.

What the HTTP suite cannot see: the invariant after each step (not only at the end), aborts that
land at every point of a request's life (compiling, queued, mid-chunk, retracted, after its end),
the engine's own objects after the run, and greedy tokens against a run without any chaos.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from chaos_grammars import BAD_TOKEN_RANGE, IMPOSSIBLE, SMALL_SCHEMA

from radixlm.core.finish import FinishReason
from radixlm.core.messages import (
    AbortRequest,
    CheckInvariant,
    ClearDiskCache,
    ControlReply,
    ControlRequest,
    FlushCache,
    GenerateRequest,
    GetStats,
    TokenOutput,
)
from radixlm.core.params import SamplingParams
from radixlm.core.request import Req
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.engine.engine import Engine
from radixlm.engine.frontend import RequestState
from radixlm.speculative.cost import StepCost

pytestmark = pytest.mark.chaos

POOL = 160
CHUNK = 16
STEPS = 250  # steps with chaos; then the core drains with no more of it
# Logprob gap below which two greedy choices count as a tie: batching changes float rounding
# (by ~1e-6 here), which may flip a tie. Tokens after a tie in the reference are not compared.
TIE = 1e-4

PHRASE = " is one of the letters, "
CLIENT_ABORT = AbortRequest("").message  # what an abort says when its caller gives no reason
# A step cost that makes every draft token worth its row: with speculation on, every request
# with a draft verifies it (grammars, logprobs, sampling, retraction and aborts included).
FLAT = StepCost((1, 64), (1.0, 1.0))


@dataclass
class Planned:
    """A request the test sent, what it expects, and what came back."""

    msg: GenerateRequest
    kind: str
    error: str | None = None  # the abort message expected (a request that must fail)
    aborted_by_test: bool = False
    output_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    num_input_logprobs: int = 0
    num_output_logprobs: int = 0
    jumped: bool = False  # an output after the first carried several tokens (a forced tail)

    def take(self, out: TokenOutput) -> None:
        assert self.finish is None, f"{self.msg.rid} produced output after it finished"
        if self.output_ids and len(out.new_ids) > 1:
            self.jumped = True
        self.output_ids += out.new_ids
        self.finish = out.finish_reason
        self.num_input_logprobs += len(out.input_logprobs)
        self.num_output_logprobs += len(out.output_logprobs)


class Chaos:
    """The random load: each call to `between_steps` may add, abort and call into the core."""

    def __init__(self, core: EngineCore, rng: random.Random, prefix: str) -> None:
        self.core, self.rng, self.prefix = core, rng, prefix
        self.planned: dict[str, Planned] = {}
        self.prefixes = [self.ids(rng.randint(8, 40)) for _ in range(3)]
        self.kinds: list[tuple[Callable[[str], Planned], int]] = [
            (self.greedy, 6),
            (self.sampled, 3),
            (self.long_prompt, 2),
            (self.schema, 3),
            (self.letters, 2),
            (self.prefill_only, 1),
            (self.logprobs, 2),
            (self.too_big, 1),
            (self.bad_grammar, 1),
            (self.impossible_grammar, 1),
        ]
        if core.speculator is not None:
            self.kinds.append((self.repeats, 4))
        if core.speculator is not None or core.disk_tier is not None:
            self.kinds.append((self.salted, 3))

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, 49000) for _ in range(n)]

    def prompt(self, n: int) -> list[int]:
        """n tokens, often after a prefix other requests share (radix hits, locked nodes)."""
        if self.rng.random() < 0.6:
            prefix = self.rng.choice(self.prefixes)
            return (prefix + self.ids(n))[: max(n, len(prefix) + 1)]
        return self.ids(n)

    def request(
        self, rid: str, prompt: list[int], fits: bool = True, **params: Any
    ) -> GenerateRequest:
        p = SamplingParams(**{"temperature": 0.0, "ignore_eos": True, **params})
        assert (len(prompt) + p.max_new_tokens <= POOL) == fits, "the pool decides who may abort"
        return GenerateRequest(rid, prompt, p)

    # ---- the kinds of request ------------------------------------------------------------------

    def greedy(self, rid: str) -> Planned:
        msg = self.request(rid, self.prompt(self.rng.randint(4, 40)), max_new_tokens=self.n(40))
        return Planned(msg, "greedy")

    def repeats(self, rid: str) -> Planned:
        """A prompt that repeats a phrase: prompt lookup drafts its continuation."""
        phrase = self.ids(self.rng.randint(3, 8))
        prompt = (phrase * 8)[: self.rng.randint(2 * len(phrase), 48)]
        return Planned(self.request(rid, prompt, max_new_tokens=self.n(40)), "greedy")

    def salted(self, rid: str) -> Planned:
        """A tenant's request (its own cache namespace past the public prefix), greedy: over a
        shared prefix, or the same prompt as another tenant's."""
        prompt = self.prompt(self.rng.randint(4, 40))
        msg = self.request(rid, prompt, max_new_tokens=self.n(40))
        salt = self.rng.choice(["tenant-a", "tenant-b"])
        return Planned(GenerateRequest(rid, msg.input_ids, msg.params, cache_salt=salt), "greedy")

    def sampled(self, rid: str) -> Planned:
        p = {"temperature": 1.0, "sampling_seed": self.rng.randrange(1 << 30), "ignore_eos": False}
        return Planned(
            self.request(rid, self.prompt(20), max_new_tokens=self.n(40), **p), "sampled"
        )

    def long_prompt(self, rid: str) -> Planned:
        n = self.rng.randint(80, 140)
        msg = self.request(rid, self.prompt(n), max_new_tokens=self.n(POOL - n))
        return Planned(msg, "greedy")

    def schema(self, rid: str) -> Planned:
        p = {"temperature": 1.0, "sampling_seed": self.rng.randrange(1 << 30)}
        msg = self.request(
            rid, self.ids(6), max_new_tokens=40, json_schema=json.dumps(SMALL_SCHEMA), **p
        )
        return Planned(msg, "schema")

    def letters(self, rid: str) -> Planned:
        """Long forced tails (jump-forward); a fresh pattern now and then, so that it compiles."""
        letters = "abcdefgh" if self.rng.random() < 0.5 else self.rng.choice("abcdefgh") + "xyz"
        regex = f"(({'|'.join(letters)})({PHRASE})){{2,5}}"
        p = {"temperature": 1.0, "sampling_seed": self.rng.randrange(1 << 30)}
        msg = self.request(rid, self.ids(8), max_new_tokens=self.n(60), regex=regex, **p)
        return Planned(msg, "letters")

    def logprobs(self, rid: str) -> Planned:
        """Prompt logprobs owed across chunks (and retractions) of a long prompt."""
        n = self.rng.randint(20, 120)
        msg = self.request(rid, self.prompt(n), max_new_tokens=self.n(POOL - n - 2))
        start = self.rng.randint(0, len(msg.input_ids) - 1)
        top = self.rng.randint(0, 3)
        return Planned(
            GenerateRequest(rid, msg.input_ids, msg.params, True, start, top), "logprobs"
        )

    def prefill_only(self, rid: str) -> Planned:
        return Planned(self.request(rid, self.prompt(30), max_new_tokens=0), "prefill-only")

    def too_big(self, rid: str) -> Planned:
        msg = self.request(rid, self.ids(POOL + 5), fits=False, max_new_tokens=1)
        return Planned(msg, "too-big", error=f"KV cache holds only {POOL}")

    def bad_grammar(self, rid: str) -> Planned:
        msg = self.request(rid, self.ids(5), max_new_tokens=8, ebnf=BAD_TOKEN_RANGE)
        return Planned(msg, "bad-grammar", error="invalid ebnf")

    def impossible_grammar(self, rid: str) -> Planned:
        msg = self.request(rid, self.ids(5), max_new_tokens=8, regex=IMPOSSIBLE)
        return Planned(msg, "impossible-grammar", error="grammar error")

    def n(self, most: int) -> int:
        return self.rng.randint(1, max(1, most))

    # ---- between two steps ---------------------------------------------------------------------

    def between_steps(self) -> None:
        rng, core = self.rng, self.core
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            make = rng.choices([k for k, _ in self.kinds], [w for _, w in self.kinds])[0]
            planned = make(f"{self.prefix}{len(self.planned)}")
            self.planned[planned.msg.rid] = planned
            assert core.handle(planned.msg) is None
        if self.planned and rng.random() < 0.15:
            self.abort(rng.choice(list(self.planned.values())))
        if rng.random() < 0.05:
            core.handle(AbortRequest("never-sent"))
        if rng.random() < 0.05:
            self.control()

    def abort(self, planned: Planned) -> None:
        """Abort a request wherever it is (also one already finished: nothing must happen)."""
        if planned.finish is None:
            planned.aborted_by_test = True
        assert self.core.handle(AbortRequest(planned.msg.rid, "chaos abort")) is None

    def control(self) -> None:
        call = self.rng.choice([FlushCache(), ClearDiskCache(), GetStats(), CheckInvariant()])
        reply = self.core.handle(ControlRequest(0, call))
        assert isinstance(reply, ControlReply)
        assert not isinstance(reply.value, BaseException), reply.value
        if isinstance(call, FlushCache):  # refused while anything runs or waits
            s = self.core.scheduler
            assert reply.value is (not (s.running or s.waiting))

    def take(self, outs: list[TokenOutput]) -> None:
        for out in outs:
            self.planned[out.rid].take(out)


def step(core: EngineCore) -> list[TokenOutput]:
    with torch.inference_mode():
        outs = core.step()
    core.check_invariant()
    for req in core.scheduler.running:
        assert req.spec_draft == 0 and req.kv_len < req.seq_len, "a draft outlived its step"
    return outs


def run_chaos(core: EngineCore, seed: int) -> Chaos:
    chaos = Chaos(core, random.Random(seed), prefix=f"chaos{seed}-")
    for _ in range(STEPS):
        chaos.between_steps()
        chaos.take(step(core))
    for _ in range(2000):
        if not core.has_work:
            return chaos
        chaos.take(step(core))
    pytest.fail(f"seed {seed}: the core is still busy after its load ended")


def reference(tiny_model_dir: Path, planned: list[Planned]) -> dict[str, list[tuple[int, float]]]:
    """The greedy requests' tokens in one calm batch on a roomy pool, with the logprob gap
    between the top two candidates at each position."""
    core = EngineCore(
        EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=4096, random_seed=0)
    )
    for p in planned:
        core.add(GenerateRequest(p.msg.rid, p.msg.input_ids, p.msg.params, True, -1, 2))
    outs: dict[str, list[tuple[int, float]]] = {p.msg.rid: [] for p in planned}
    while core.has_work:
        for o in step(core):
            for (_, token), top in zip(o.output_logprobs, o.output_top_logprobs, strict=True):
                (first, _), (second, _) = top
                assert first is not None and second is not None
                outs[o.rid].append((token, first - second))
    return outs


def agrees_until_a_tie(got: list[int], want: list[tuple[int, float]]) -> bool:
    for token, (expected, gap) in zip(got, want, strict=True):
        if gap < TIE:
            return True  # either token may come first here
        if token != expected:
            return False
    return True


def live_reqs(prefix: str) -> list[Req]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Req and o.rid.startswith(prefix)]


@pytest.mark.parametrize(
    "seed, extra, torch_backend",
    [
        (1, {}, False),
        (2, {}, False),
        (3, {}, False),
        (4, {"speculative_algorithm": "both"}, False),
        (5, {"speculative_algorithm": "both", "kv_cache_dir": "disk"}, False),
        (6, {"disable_radix_cache": True, "target_itl_ms": 20.0}, False),
        (7, {"speculative_algorithm": "both"}, True),
        (8, {"tp_size": 2}, False),
    ],
)
def test_random_adds_aborts_and_calls_between_every_step(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    chaos_seed: Callable[[int], int],
    seed: int,
    extra: dict[str, Any],
    torch_backend: bool,
) -> None:
    """The same chaos over engine options: speculative decoding (drafts verified in steps that
    retract, abort, chunk and constrain), a disk tier under the tree (evictions written, hits
    loaded back, the tier cleared mid-run), no radix cache with an adaptive prefill budget, the
    torch kernel backend (what runs on a GPU), two tensor-parallel ranks. Greedy outputs are
    those of a calm run without any of them."""
    seed = chaos_seed(seed)
    if torch_backend:
        monkeypatch.setenv("RADIXLM_CPU_KERNELS", "0")
    if "kv_cache_dir" in extra:
        extra = {**extra, "kv_cache_dir": str(tmp_path / extra["kv_cache_dir"])}
    core = EngineCore(
        EngineArgs(
            model_path=str(tiny_model_dir),
            max_total_tokens=POOL,
            chunked_prefill_size=CHUNK,
            random_seed=seed,
            **extra,
        )
    )
    assert (core.runner.backend.name == "torch") == torch_backend
    if core.speculator is not None:
        core.speculator.cost, core.speculator.cost_fit = FLAT, None
    try:
        with caplog.at_level(logging.ERROR, logger="radixlm.engine.core"):
            check_chaos(tiny_model_dir, core, seed, extra)
        # No step's batched sampling failed (each request alone again is the fallback for an
        # internal error: bad grammars and impossible ones end their requests without one).
        failed = [r.getMessage() for r in caplog.records if r.name == "radixlm.engine.core"]
        assert not failed, failed
    finally:  # the other rank (and this process's threads), the disk tier's writer
        core.runner.close()
        core.close()


def check_chaos(tiny_model_dir: Path, core: EngineCore, seed: int, extra: dict[str, Any]) -> None:
    """Run the chaos on core, then check every request's end, the greedy tokens and memory."""
    chaos = run_chaos(core, seed)
    planned = list(chaos.planned.values())
    why = f"seed {seed}, {extra}"

    # Every request ended exactly once, and as the test expected.
    for p in planned:
        rid, reason, n = p.msg.rid, p.finish, len(p.output_ids)
        assert reason is not None, f"{why}: {rid} never ended"
        if p.aborted_by_test and reason.is_abort and reason.message == "chaos abort":
            continue
        if p.error is not None:
            assert reason.is_abort and p.error in reason.message, (why, rid, reason)
        elif reason.is_abort:
            pytest.fail(f"{why}: {rid} ({p.kind}) was aborted: {reason.message}")
        elif p.kind == "schema" and reason.kind.value == "stop":
            jsonschema.validate(json.loads(core.tokenizer.decode(p.output_ids)), SMALL_SCHEMA)
        elif p.msg.params.ignore_eos and p.kind != "letters":
            assert reason == FinishReason.at_length(p.msg.params.max_new_tokens), (why, rid)
            assert n == p.msg.params.max_new_tokens, (why, rid, n)
        if p.kind == "logprobs" and not reason.is_abort:
            owed = len(p.msg.input_ids) - p.msg.logprob_start_len
            assert p.num_input_logprobs == owed, (why, rid, p.num_input_logprobs, owed)
            assert p.num_output_logprobs == n, (why, rid, p.num_output_logprobs, n)
        if p.kind == "letters" and not reason.is_abort:
            out = core.tokenizer.decode(p.output_ids)
            assert out == "".join(c + PHRASE for c in out[:: len(PHRASE) + 1])[: len(out)], out

    # The load did what it was meant to: the pool overflowed, aborts hit running requests,
    # forced tails were jumped over.
    assert core.scheduler.num_retractions > 0, why
    assert any(p.aborted_by_test and p.finish and p.finish.is_abort for p in planned), why
    assert any(p.jumped for p in planned), why
    if core.speculator is not None:  # drafts were verified, and some held
        counters = core.speculator.counters.values()
        assert sum(c.accepted for c in counters) > 0, why
    if core.disk_tier is not None:  # evicted prefixes went to disk, and hits came back from it
        assert core.disk_tier.loaded_tokens > 0, why

    # Greedy tokens are those of a calm run (up to a near-tie, where rounding may pick either).
    greedy = [p for p in planned if p.kind == "greedy" and not p.aborted_by_test]
    want = reference(tiny_model_dir, greedy)
    wrong = [p.msg.rid for p in greedy if not agrees_until_a_tie(p.output_ids, want[p.msg.rid])]
    assert not wrong, f"{why}: greedy outputs changed by the chaos: {wrong}"

    # Memory back to its baseline: every slot free once the cache is flushed, no request left.
    s = core.scheduler
    assert not (s.running or s.waiting or s.table.outputs) and core.grammar.num_pending == 0
    assert s.allocator.num_free + s.cache.evictable_size == POOL
    assert s.flush_cache() and s.allocator.num_free == POOL and s.cache.total_size() == 0
    core.check_invariant()
    assert live_reqs(f"chaos{seed}-") == [], f"{why}: requests outlived the run"


def test_async_callers_that_cancel_abort_or_leave(
    tiny_model_dir: Path, chaos_seed: Callable[[int], int]
) -> None:
    """The in-process Engine under asyncio callers that cancel their call, abort it, or leave
    its stream (closing it, or just dropping it): nothing stays in the engine or its client."""
    seed = chaos_seed(4)
    rng, prefix = random.Random(seed), f"async{seed}-"
    args = {"max_total_tokens": POOL, "chunked_prefill_size": CHUNK, "random_seed": seed}
    with Engine(str(tiny_model_dir), **args) as engine:

        async def caller(rid: str) -> str:
            fate = rng.choice(["complete", "cancel", "abort", "close", "drop"])
            prompt = " ".join(rng.choices(["radix", "tree", "cache", "slot"], k=rng.randint(1, 20)))
            long = fate != "complete"
            max_new = POOL - 40 if long else rng.randint(0, 60)
            params = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0}
            await asyncio.sleep(rng.uniform(0, 0.2))
            if fate in ("close", "drop"):
                stream = await engine.async_generate(prompt, params, rid=rid, stream=True)
                assert isinstance(stream, AsyncGenerator)
                async for chunk in stream:
                    if len(chunk["output_ids"]) >= rng.randint(1, 3):
                        break
                if fate == "close":
                    await stream.aclose()
                return fate  # a dropped stream is closed when collected (asyncio's hook)
            call = asyncio.ensure_future(engine.async_generate(prompt, params, rid=rid))
            if fate == "cancel":
                await asyncio.sleep(rng.uniform(0, 0.05))
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                return fate
            if fate == "abort":
                await asyncio.sleep(rng.uniform(0, 0.05))
                engine.abort_request(rid)
            out = await call
            assert isinstance(out, dict)
            reason = out["meta_info"]["finish_reason"]
            if reason["type"] == "abort":
                assert fate == "abort" and reason["message"] == CLIENT_ABORT, (rid, reason)
            else:
                assert reason == {"type": "length", "length": max_new}, (rid, reason)
            return fate

        async def main() -> list[str]:
            return await asyncio.gather(*(caller(f"{prefix}{i}") for i in range(40)))

        fates = asyncio.run(main())
        assert len(set(fates)) == 5, fates
        deadline = time.monotonic() + 30
        while (stats := engine.get_stats())["num_running_reqs"] + stats["num_queue_reqs"]:
            assert time.monotonic() < deadline, f"seed {seed}: requests still run: {stats}"
            time.sleep(0.05)
        engine.check_invariant()
        assert engine.flush_cache() and engine.get_stats()["num_used_tokens"] == 0
        gc.collect()
        states = [o for o in gc.get_objects() if type(o) is RequestState]
        assert not [s.req.rid for s in states if s.req.rid.startswith(prefix)], f"seed {seed}"
