"""The scheduler with no model: plans out, fake sampled tokens back in.

Each test drives `schedule()` / `update()` by hand and checks the plan (chunks, logit rows, rows
to sample, prompt logprobs owed), the outputs, and the slot invariant after every step. The
engine core runs the same scheduler with a real model in tests/engine/test_core.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.core.messages import GenerateRequest, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.core.plan import SampledReq, StepPlan
from radixlm.core.request import Req
from radixlm.scheduler.scheduler import Scheduler, SchedulerConfig
from radixlm.tokenizer import Tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.load(str(tiny_model_dir))


Make = Callable[..., Scheduler]


@pytest.fixture
def make(tokenizer: Tokenizer) -> Make:
    def build(pool: int = 256, **config: Any) -> Scheduler:
        allocator = SlotAllocator(pool, check=True)
        cfg = {"context_len": 512, "chunked_prefill_size": 64, "max_running_requests": 8}
        return Scheduler(
            RadixCache(allocator), allocator, tokenizer, SchedulerConfig(**{**cfg, **config})
        )

    return build


def req(rid: str, prompt: Sequence[int], **params: Any) -> Req:
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True, **params})
    return Req.from_message(GenerateRequest(rid, list(prompt), p), (EOS,))


def prompt(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


def step(s: Scheduler, token: Callable[[Req], int] = lambda r: 100 + r.seq_len) -> StepPlan:
    """One step: the plan, each sampled row answered with token(req), then the checks."""
    plan = s.schedule()
    results = [SampledReq(tokens=[token(r.req)] * r.num_samples) for r in plan.reqs]
    s.update(plan, results)
    s.check_invariant()
    return plan


def drain(s: Scheduler, max_steps: int = 200) -> dict[str, TokenOutput]:
    """Step until idle; the last output of each request, with all its new_ids."""
    last: dict[str, TokenOutput] = {}
    ids: dict[str, list[int]] = {}
    for _ in range(max_steps):
        for o in s.take_outputs():
            assert o.rid not in last or not last[o.rid].finished, "output after the end"
            ids.setdefault(o.rid, []).extend(o.new_ids)
            last[o.rid] = o
        if not s.has_work:
            for rid, o in last.items():
                o.new_ids = ids[rid]
            return last
        step(s)
    pytest.fail("the scheduler is still busy")


def test_prefill_then_decodes_sample_one_row_each(make: Make) -> None:
    s = make()
    for i in range(3):
        s.add(req(f"r{i}", prompt(5 + i, start=10 * i + 10)))
    plan = step(s)
    assert [len(r.seq.new_ids) for r in plan.reqs] == [5, 6, 7]
    assert all(r.seq.start == 0 and r.seq.num_logits == 1 and r.num_samples == 1 for r in plan.reqs)
    outs = s.take_outputs()
    assert [o.new_ids for o in outs] == [[105], [106], [107]]
    plan = step(s)
    assert [(r.seq.new_ids, r.seq.start) for r in plan.reqs] == [([105], 5), ([106], 6), ([107], 7)]
    assert [o.new_ids for o in s.take_outputs()] == [[106], [107], [108]]


def test_max_new_tokens_finishes_and_caches_the_sequence(make: Make) -> None:
    s = make()
    s.add(req("a", prompt(8), max_new_tokens=3))
    out = drain(s)["a"]
    assert out.new_ids == [108, 109, 110]
    assert out.finish_reason is not None and out.finish_reason.to_dict() == {
        "type": "length",
        "length": 3,
    }
    # Finished: its prompt and output (all but the last token, which has no K/V) are in the tree.
    assert s.cache.total_size() == 10 and not s.running
    s.add(req("b", prompt(8) + [108, 109, 110, 7]))
    plan = step(s)
    assert plan.reqs[0].seq.start == 10 and plan.reqs[0].seq.new_ids == [110, 7]
    assert s.running[0].cached_tokens == 10


def test_a_long_prompt_is_prefilled_in_chunks_shared_as_it_goes(make: Make) -> None:
    s = make(chunked_prefill_size=8)
    s.add(req("long", prompt(20)))
    chunks = [step(s).reqs[0] for _ in range(3)]
    assert [(c.seq.start, len(c.seq.new_ids), c.num_samples) for c in chunks] == [
        (0, 8, 0),
        (8, 8, 0),
        (16, 4, 1),
    ]
    assert [c.seq.num_logits for c in chunks] == [0, 0, 1]
    assert s.cache.total_size() >= 16  # each chunk went into the tree at once


def test_max_new_tokens_zero_caches_the_prompt_without_sampling(make: Make) -> None:
    s = make()
    s.add(req("warm", prompt(6), max_new_tokens=0))
    plan = step(s)
    assert plan.reqs[0].num_samples == 0
    (out,) = s.take_outputs()
    assert out.new_ids == [] and out.finish_reason is not None
    assert s.cache.total_size() == 6


def test_prompt_logprobs_owed_are_planned_chunk_by_chunk(make: Make) -> None:
    s = make(chunked_prefill_size=8)
    r = Req.from_message(
        GenerateRequest(
            "lp",
            prompt(12),
            SamplingParams(temperature=0.0, max_new_tokens=1),
            return_logprob=True,
            logprob_start_len=3,
        ),
        (EOS,),
    )
    s.add(r)
    first, second = step(s).reqs[0], step(s).reqs[0]
    # Token t is predicted by position t - 1: tokens 3..8 from the first chunk's positions 2..7.
    assert first.seq.logit_from == 2 and first.prompt_logprobs == (3, 9)
    assert second.seq.logit_from == 8 and second.prompt_logprobs == (9, 12)
    assert r.input_lp_next == 12


def test_retraction_keeps_every_request_and_its_output(make: Make) -> None:
    roomy = make()
    small = make(pool=48)
    for s in (roomy, small):
        for i in range(4):
            s.add(req(f"r{i}", prompt(6, start=20 * i + 10), max_new_tokens=12))
    want, got = drain(roomy), drain(small)
    assert small.num_retractions > 0
    assert {k: v.new_ids for k, v in got.items()} == {k: v.new_ids for k, v in want.items()}
    assert small.allocator.num_free + small.cache.evictable_size == 48


def test_a_prompt_that_can_never_fit_is_rejected_at_once(make: Make) -> None:
    s = make(pool=16)
    s.add(req("big", prompt(20)))
    (out,) = s.take_outputs()
    assert out.finish_reason is not None and out.finish_reason.is_abort
    assert "KV cache holds only 16" in out.finish_reason.message and not s.has_work


def test_abort_frees_a_running_request(make: Make) -> None:
    s = make()
    s.add(req("a", prompt(6), max_new_tokens=50))
    step(s)
    step(s)
    assert s.abort("a", "bye") and not s.abort("a")
    out = s.take_outputs()[-1]
    assert out.finish_reason is not None and out.finish_reason.message == "bye"
    assert not s.running and s.allocator.num_free + s.cache.evictable_size == 256
    s.check_invariant()


class FakeGrammar:
    """An OutputGrammar that appends `forced` after each sampled token, its last one a draft,
    and verifies the draft against the model's token."""

    def __init__(self, forced: list[int]) -> None:
        self.forced = forced
        self.num_draft = 0
        self.error: str | None = None
        self.is_terminated = False
        self.closed = False

    def settle(self, r: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        keep, token = len(r.output_ids), sampled[-1]
        if self.num_draft:
            self.num_draft = 0
            if sampled[0] != r.output_ids[-1]:
                keep, token = keep - 1, sampled[0]
        self.num_draft = 1
        return keep, [token, *self.forced]


@pytest.mark.parametrize("agrees", [True, False])
def test_a_draft_is_verified_by_the_row_before_it(make: Make, agrees: bool) -> None:
    s = make()
    r = req("g", prompt(5), max_new_tokens=20)
    r.grammar = FakeGrammar(forced=[7, 8, 9])
    s.add(r)
    step(s, token=lambda _: 50)  # prefill: 50, then forced 7 8 and the draft 9
    assert r.output_ids == [50, 7, 8, 9] and r.num_draft == 1 and r.kv_len == 5
    assert s.take_outputs()[0].new_ids == [50, 7, 8]  # the draft is not sent
    plan = step(s, token=lambda _: 9 if agrees else 60)
    (sr,) = plan.reqs
    # The draft is fed with the tokens before it; the row before it and the last are sampled.
    assert sr.seq.new_ids == [50, 7, 8, 9] and sr.num_samples == 2 and sr.seq.num_logits == 2
    (out,) = s.take_outputs()
    if agrees:  # kept: it is sent, and the token after it is the step's
        assert r.output_ids == [50, 7, 8, 9, 9, 7, 8, 9] and out.new_ids == [9, 9, 7, 8]
        assert r.kv_len == 9
    else:  # replaced by the model's token; the draft's slot went back to the free list
        assert r.output_ids == [50, 7, 8, 60, 7, 8, 9] and out.new_ids == [60, 7, 8]
        assert r.kv_len == 8


def test_a_request_that_fits_is_never_aborted_while_others_hold_slots(make: Make) -> None:
    """Pool 64, chunks of 16: B's long prompt is prefilled in chunks while A decodes; when A
    runs out of slots it must wait (or B must), not be aborted as too big for the pool."""
    s = make(pool=64, chunked_prefill_size=16)
    s.add(req("a", prompt(10), max_new_tokens=50))
    step(s)
    s.add(req("b", prompt(60, start=200), max_new_tokens=2))
    out = drain(s, max_steps=400)
    for rid in ("a", "b"):
        reason = out[rid].finish_reason
        assert reason is not None and not reason.is_abort, (rid, reason)
    assert len(out["a"].new_ids) == 50 and len(out["b"].new_ids) == 2


def test_admission_reserves_the_rest_of_a_prompt_being_prefilled(make: Make) -> None:
    """B's 60-token prompt stalls halfway (A holds the slots it needs); C, smaller and later,
    must not take slots B's remaining chunks need: it is admitted only once B's prompt is in."""
    s = make(pool=64, chunked_prefill_size=24)
    s.add(req("a", prompt(10), max_new_tokens=5))
    s.add(req("b", prompt(60, start=200), max_new_tokens=2))
    b = s.waiting[-1]
    step(s)
    s.add(req("c", prompt(4, start=400), max_new_tokens=2))
    while s.has_work:
        plan = step(s)
        if any(r.req.rid == "c" and r.seq.start == 0 for r in plan.reqs):
            assert b.finished or b.kv_len >= 60, "c admitted while b's prompt still waits"
        s.take_outputs()
    assert s.num_retractions == 0


def test_a_step_never_exceeds_the_chunked_prefill_size(make: Make) -> None:
    """More requests than the token budget: running requests are capped so that the decodes
    alone fit a step, and every step still admits or continues a prefill."""
    s = make(chunked_prefill_size=8, max_running_requests=64)
    for i in range(12):
        s.add(req(f"r{i}", prompt(5, start=10 * i + 10), max_new_tokens=6))
    for _ in range(200):
        if not s.has_work:
            break
        plan = step(s)
        assert sum(len(r.seq.new_ids) for r in plan.reqs) <= 8
        assert len(s.running) <= 8
        s.take_outputs()
    assert not s.has_work


class BrokenGrammar(FakeGrammar):
    def settle(self, r: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        raise RuntimeError("broken matcher")


def test_an_error_in_one_requests_grammar_ends_that_request_only(make: Make) -> None:
    s = make()
    bad = req("bad", prompt(5), max_new_tokens=8)
    bad.grammar = BrokenGrammar(forced=[])
    s.add(bad)
    s.add(req("good", prompt(5, start=50), max_new_tokens=3))
    out = drain(s)
    reason = out["bad"].finish_reason
    assert reason is not None and reason.is_abort and "broken matcher" in reason.message
    assert out["good"].new_ids == [105, 106, 107]
    assert s.allocator.num_free + s.cache.evictable_size == 256


def test_a_sampling_error_ends_that_request_only(make: Make) -> None:
    s = make()
    s.add(req("bad", prompt(5), max_new_tokens=8))
    s.add(req("good", prompt(5, start=50), max_new_tokens=3))
    plan = s.schedule()
    s.update(
        plan,
        [
            SampledReq(error="internal error: boom") if r.req.rid == "bad" else SampledReq([105])
            for r in plan.reqs
        ],
    )
    s.check_invariant()
    bad = next(o for o in s.take_outputs() if o.rid == "bad")
    assert bad.finish_reason is not None and bad.finish_reason.message == "internal error: boom"
    assert [r.rid for r in s.running] == ["good"]


def test_a_request_past_its_timeout_is_aborted_and_releases_its_slots(make: Make) -> None:
    s = make(request_timeout_s=60.0)
    s.add(req("slow", prompt(6), max_new_tokens=100))
    s.add(req("queued", prompt(6, start=50), max_new_tokens=100))
    step(s)
    s.add(req("fresh", prompt(6, start=90), max_new_tokens=3))
    for r in s.running:  # slow and queued have been in the engine for a minute now
        if r.rid != "fresh":
            r.arrival -= 61
    step(s)
    out = drain(s)
    for rid in ("slow", "queued"):
        reason = out[rid].finish_reason
        assert reason is not None and reason.is_abort and "60 s request timeout" in reason.message
    assert out["fresh"].new_ids == [106, 107, 108]
