"""Speculative decoding in the engine step, on a tiny random-weight model stepped by hand: every
output is compared with the same requests decoded without drafts, every scenario asserts that
drafts were accepted (so it cannot pass without speculating), and the slot invariant is checked
after every step."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from radixlm.cli import add_engine_args, engine_args_from
from radixlm.core.messages import GenerateRequest, SpecCounters, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.core.plan import SampledReq, StepPlan
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.grammar import GrammarSpec
from radixlm.grammar.state import GrammarState
from radixlm.speculative.config import SpecConfig
from radixlm.speculative.cost import StepCost

Make = Callable[..., EngineCore]

# Step costs that make every draft token worth its row (up to 64 rows), or none (each row costs
# its share: a guess right less than always loses).
FLAT = StepCost((1, 64), (1.0, 1.0))
COMPUTE_BOUND = StepCost((1, 64), (1.0, 64.0))


@pytest.fixture
def make(tiny_model_dir: Path) -> Callable[..., EngineCore]:
    """Build engine cores over the tiny model, each with its own KV pool."""

    def build(
        algorithm: str | None,
        pool: int = 4096,
        seed: int = 0,
        cost: StepCost | None = FLAT,
        **args: Any,
    ) -> EngineCore:
        """cost: the speculator's step cost, held fixed; None keeps the one measured at start,
        refit from the steps run."""
        core = EngineCore(
            EngineArgs(
                model_path=str(tiny_model_dir),
                max_total_tokens=pool,
                random_seed=seed,
                speculative_algorithm=algorithm,
                **args,
            )
        )
        if core.speculator is not None and cost is not None:
            core.speculator.cost = cost
            core.speculator.cost_fit = None
        return core

    return build


def repetitive(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase (prompt lookup finds its continuations)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrase = torch.randint(3, 49000, (4 + i % 5,), generator=gen).tolist()
        out.append(phrase * (3 + i % 3) + phrase[: i % 4])
    return out


def random_prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49000, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


def request(rid: str, ids: list[int], **params: Any) -> GenerateRequest:
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 24, **params})
    return GenerateRequest(rid=rid, input_ids=list(ids), params=p)


def step(c: EngineCore) -> list[TokenOutput]:
    with torch.inference_mode():
        outs = c.step()
    c.check_invariant()
    for req in c.scheduler.running:
        assert req.spec_draft == 0 and req.kv_len < req.seq_len, "a draft outlived its step"
    return outs


def run(c: EngineCore, reqs: list[GenerateRequest], full: bool = False) -> dict[str, Any]:
    """Add reqs, step until idle; rid -> output ids (or every TokenOutput with full)."""
    for r in reqs:
        c.add(r)
    outs: dict[str, list[TokenOutput]] = {}
    for _ in range(2000):
        if not c.has_work:
            break
        for o in step(c):
            outs.setdefault(o.rid, []).append(o)
    assert not c.has_work
    if full:
        return outs
    return {rid: [t for o in os for t in o.new_ids] for rid, os in outs.items()}


def accepted(c: EngineCore) -> int:
    assert c.speculator is not None
    return sum(x.accepted for x in c.speculator.counters.values())


def assert_pool_clean(c: EngineCore) -> None:
    """Nothing runs, and flushing the tree frees the whole pool: no slot was left behind."""
    assert not c.scheduler.running
    assert c.scheduler.flush_cache()
    assert c.allocator.num_free == c.allocator.num_slots


@pytest.mark.parametrize(
    "algorithm, cost", [("ngram", FLAT), ("radix", FLAT), ("both", FLAT), ("both", None)]
)
def test_greedy_identity_over_prompts_and_batches(
    make: Make, algorithm: str, cost: StepCost | None
) -> None:
    """Drafts as long as allowed (FLAT: 14 decodes fill the 64 rows), or as the step cost
    measured on this machine at start decides."""
    prompts = repetitive(10, 1) + random_prompts(4, 2)
    base = make(None)
    spec = make(algorithm, cost=cost)
    # Batches of 1, 3 and all 14; each batch twice, so the second run can draft from the tree.
    for sizes in ([1] * 3, [3, 3], [len(prompts)]):
        start = 0
        for size in sizes:
            batch = prompts[start : start + size]
            start += size
            for again in range(2):
                reqs = [request(f"r{start}-{i}-{again}", ids) for i, ids in enumerate(batch)]
                assert run(spec, reqs) == run(base, reqs)
    assert accepted(spec) >= 5, spec.speculator and spec.speculator.counters
    assert_pool_clean(spec)


def test_radix_drafts_from_an_earlier_run(make: Make) -> None:
    prompts = random_prompts(3, 5)
    base, spec = make(None), make("radix")
    reqs = [request(f"a{i}", ids, max_new_tokens=40) for i, ids in enumerate(prompts)]
    assert run(spec, reqs) == run(base, reqs)
    assert spec.speculator is not None
    first = copy.copy(spec.speculator.counters["radix"])
    # The same program again: every continuation is in the tree.
    assert run(spec, reqs) == run(base, reqs)
    again = spec.speculator.counters["radix"]
    assert again.accepted - first.accepted >= 3 * 30
    assert_pool_clean(spec)


def test_counters_and_stats(make: Make) -> None:
    spec = make("both")
    for _ in range(2):  # the second run drafts from the tree
        run(spec, [request("s", repetitive(1, 3)[0], max_new_tokens=30)])
    assert spec.speculator is not None
    counters = spec.stats().spec
    assert set(counters) == {"ngram", "radix"}
    total = SpecCounters(
        sum(c.drafted for c in counters.values()),
        sum(c.accepted for c in counters.values()),
        sum(c.verified for c in counters.values()),
    )
    assert 0 < total.accepted <= total.drafted and total.verified > 0
    assert 1.0 < total.accept_length <= 1 + spec.speculator.config.num_draft_tokens
    # stats() is a copy: later steps do not change it
    run(spec, [request("t", repetitive(1, 4)[0], max_new_tokens=30)])
    assert spec.stats().spec != counters


def test_seeded_sampling_gives_the_same_tokens(make: Make) -> None:
    """A request's sampling_seed draws depend on the step only, so drafting changes nothing."""
    prompts = repetitive(4, 6)
    base, spec = make(None), make("both")
    reqs = [
        request(f"s{i}", ids, temperature=0.7, top_k=3, sampling_seed=100 + i, max_new_tokens=30)
        for i, ids in enumerate(prompts)
    ]
    first = run(spec, reqs)
    assert first == run(base, reqs)
    assert run(spec, reqs) == first  # drafting from the first run's tree
    assert accepted(spec) > 0


def test_sampling_distribution_is_unchanged(make: Make) -> None:
    """Chi-square, two samples: the 3-token outputs of one prompt under top_k=2 (8 outcomes),
    with drafts from the tree (every branch sampled so far is cached) and without."""
    prompt = random_prompts(1, 11)[0]
    params = {"temperature": 1.0, "top_k": 2, "max_new_tokens": 3, "ignore_eos": True}
    counts: list[Counter[tuple[int, ...]]] = []
    n = 480
    for algorithm in (None, "radix"):
        c = make(algorithm, seed=7)
        counter: Counter[tuple[int, ...]] = Counter()
        for b in range(n // 4):  # 4 decodes at a time
            reqs = [request(f"x{b}-{i}", prompt, **params) for i in range(4)]
            counter.update(tuple(v) for v in run(c, reqs).values())
        counts.append(counter)
        if algorithm is not None:
            assert c.speculator is not None
            radix = c.speculator.counters["radix"]
            # drafts both accepted and rejected, often
            assert radix.accepted > n / 4 and radix.drafted - radix.accepted > n / 4, radix
    outcomes = sorted(set(counts[0]) | set(counts[1]))
    assert len(outcomes) >= 6, "top_k=2 over 3 tokens: up to 8 outcomes, most of them likely"
    chi2 = 0.0
    for o in outcomes:
        a, b = counts[0][o], counts[1][o]
        chi2 += (a - b) ** 2 / (a + b)
    df = len(outcomes) - 1
    # The 0.999 quantile of chi-square(df), by Wilson-Hilferty (within 1% for df >= 5).
    z = 3.0902
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, (chi2, critical, counts)
    # And a draft that always won would show: the first run's most frequent outcome dominates.
    top = counts[1].most_common(1)[0][1]
    assert top < n / 2


def test_stop_strings_eos_and_length_within_a_draft(make: Make) -> None:
    prompts = repetitive(4, 8)
    base, spec = make(None), make("both")
    plain = run(base, [request(f"p{i}", ids) for i, ids in enumerate(prompts)])
    text = {rid: base.tokenizer.decode(ids) for rid, ids in plain.items()}
    reqs = []
    for i, ids in enumerate(prompts):
        out = plain[f"p{i}"]
        stop_text = base.tokenizer.decode(out[9:11])  # a stop string in the middle of the output
        reqs += [
            request(f"stop{i}", ids, stop=[stop_text]),
            request(f"eos{i}", ids, stop_token_ids=(out[7],)),  # an end token mid-draft
            request(f"len{i}", ids, max_new_tokens=5 + i),  # the budget ends inside a draft
        ]
        assert stop_text in text[f"p{i}"]
    for _ in range(2):
        assert run(spec, reqs, full=True).keys() == run(base, reqs, full=True).keys()
        got, want = run(spec, reqs, full=True), run(base, reqs, full=True)
        for rid in want:
            assert [t for o in got[rid] for t in o.new_ids] == [
                t for o in want[rid] for t in o.new_ids
            ]
            assert got[rid][-1].finish_reason == want[rid][-1].finish_reason, rid
    assert accepted(spec) > 0
    assert_pool_clean(spec)


def test_logprobs_of_accepted_tokens(make: Make) -> None:
    prompts = repetitive(3, 12)
    base, spec = make(None), make("both")
    reqs = [
        GenerateRequest(
            rid=f"l{i}",
            input_ids=ids,
            params=SamplingParams(temperature=0.0, max_new_tokens=24),
            return_logprob=True,
            top_logprobs_num=3,
        )
        for i, ids in enumerate(prompts)
    ]
    run(spec, reqs)  # the second run drafts from the tree
    got, want = run(spec, reqs, full=True), run(base, reqs, full=True)
    assert accepted(spec) > 0
    for rid in want:
        g = [e for o in got[rid] for e in o.output_logprobs]
        w = [e for o in want[rid] for e in o.output_logprobs]
        assert [t for _, t in g] == [t for _, t in w]
        assert len(g) == 24
        for (a, _), (b, _) in zip(g, w, strict=True):
            assert a is not None and b is not None and abs(a - b) < 1e-4
        gt = [e for o in got[rid] for e in o.output_top_logprobs]
        wt = [e for o in want[rid] for e in o.output_top_logprobs]
        assert [[t for _, t in row] for row in gt] == [[t for _, t in row] for row in wt]


def test_penalties_and_parallel_samples(make: Make) -> None:
    prompts = repetitive(3, 13)
    base, spec = make(None), make("both")
    batches = [
        [
            request(f"f{i}", ids, frequency_penalty=0.5),
            request(f"r{i}", ids, repetition_penalty=1.3),
            request(f"m{i}", ids, min_new_tokens=10, presence_penalty=0.4),
        ]
        for i, ids in enumerate(prompts)
    ]
    batches.append([request(f"n{k}", prompts[0]) for k in range(3)])  # n > 1: one prompt
    for reqs in batches:
        want = run(base, reqs)
        assert run(spec, reqs) == want
        assert run(spec, reqs) == want  # drafting from the tree
    assert accepted(spec) > 0


def test_retraction_keeps_output_and_slots(make: Make) -> None:
    """Four requests of 60 new tokens on a 120-slot pool: running ones go back to the queue
    (drafts never in the way of their slots) and resume with the tokens of a roomy run."""
    prompts = repetitive(4, 14)
    base = make(None)
    spec = make("both", pool=120)
    reqs = [
        request(f"t{i}", ids, max_new_tokens=60, ignore_eos=True) for i, ids in enumerate(prompts)
    ]
    want = run(base, reqs)
    for _ in range(2):  # the second run drafts from what the tree kept of the first
        assert run(spec, reqs) == want
    assert spec.scheduler.num_retractions > 0
    assert accepted(spec) > 0
    assert_pool_clean(spec)


def test_abort_between_steps(make: Make) -> None:
    spec = make("both")
    prompts = repetitive(3, 15)
    run(spec, [request(f"w{i}", ids, max_new_tokens=100) for i, ids in enumerate(prompts)])
    for i, ids in enumerate(prompts):
        spec.add(request(f"x{i}", ids, max_new_tokens=100))
    for _ in range(6):
        step(spec)
    assert accepted(spec) > 0
    spec.abort("x1")
    spec.abort("x0")
    while spec.has_work:
        step(spec)
    assert_pool_clean(spec)


def test_a_failed_sample_drops_the_draft(make: Make) -> None:
    """Sampling fails in a step that fed a draft: the request ends with the error, the draft's
    slots are freed, and the draft never reaches the output or the tree."""
    spec = make("both")
    prompt = repetitive(1, 16)[0]
    run(spec, [request("w", prompt, max_new_tokens=60)])  # the tree drafts the next run
    real = spec._sample
    failed: list[list[int]] = []

    def sample(plan: StepPlan, logits: torch.Tensor) -> list[SampledReq]:
        drafted = [r.req for r in plan.reqs if r.req.spec_draft]
        if not drafted:
            return real(plan, logits)
        failed.append(list(drafted[0].output_ids))
        return [SampledReq(error="boom") for _ in plan.reqs]

    spec._sample = sample  # type: ignore[method-assign]
    outs = run(spec, [request("e", prompt, max_new_tokens=60)], full=True)["e"]
    assert failed, "no step fed a draft"
    sent = [t for o in outs for t in o.new_ids]
    drafted = failed[0]
    assert outs[-1].finish_reason is not None and outs[-1].finish_reason.is_abort
    assert len(sent) < len(drafted) and drafted[: len(sent)] == sent
    assert_pool_clean(spec)


def test_no_drafts_where_rows_cost_their_share(make: Make) -> None:
    """A compute-bound step (each row costs as much as a decode's) makes no draft worth it, at
    any batch; nor does a batch of more decodes than the step cost was measured for. Every
    request runs twice, so the tree holds a right draft for the second run."""
    reqs = [request(f"b{i}", ids, max_new_tokens=8) for i, ids in enumerate(repetitive(3, 17))]
    spec = make("both", cost=COMPUTE_BOUND)
    for r in reqs * 2:
        run(spec, [r])
    run(spec, reqs)
    assert spec.speculator is not None
    assert all(c.verified == 0 for c in spec.speculator.counters.values())
    spec = make("radix", cost=StepCost((1, 2), (1.0, 1.0)))
    run(spec, reqs)
    run(spec, reqs)  # 3 decodes: past the 2 rows costed
    assert spec.speculator is not None and spec.speculator.counters["radix"].verified == 0
    run(spec, reqs[:1])  # 1 decode: a 1-token draft fits
    assert (
        spec.speculator.counters["radix"].accepted == spec.speculator.counters["radix"].verified > 0
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ({"speculative_algorithm": "eagle"}, "speculative_algorithm must be one of"),
        ({"speculative_algorithm": "ngram", "speculative_num_draft_tokens": 0}, "in \\[1, 15\\]"),
        ({"speculative_algorithm": "ngram", "speculative_num_draft_tokens": 16}, "in \\[1, 15\\]"),
    ],
)
def test_bad_arguments(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineArgs(**args)


def test_grammar_requests_draft_within_their_grammar(make: Make) -> None:
    """Free text under a regex, a JSON schema closed by its budget and a jump-forward grammar:
    the tokens of a run without drafts, and drafts (from the first run's tree) accepted."""
    base, spec = make(None), make("both")
    prompt = [1, 520, 9531, 198]  # <|im_start|>assistant\n
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string"}}},
        "required": ["words"],
    }
    reqs = [
        request("regex", prompt, regex="[a-z ]{20,60}", max_new_tokens=40),
        request("closed", prompt, json_schema=json.dumps(schema), max_new_tokens=30),
        request("letters", prompt, regex="((a|b|c|d)( is one of the letters, )){4}"),
    ]
    want = run(base, reqs, full=True)
    for _ in range(2):
        got = run(spec, reqs, full=True)
        for rid, outs in want.items():
            assert [t for o in got[rid] for t in o.new_ids] == [t for o in outs for t in o.new_ids]
            assert got[rid][-1].finish_reason == outs[-1].finish_reason
    assert accepted(spec) >= 5
    assert_pool_clean(spec)


def test_a_grammar_beside_drafts_of_free_text(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    """Steps where requests without a grammar verify drafts while a grammar request samples one
    row: its mask, and theirs (every token), in one batched sample (no failure, no retry)."""
    base, spec = make(None), make("both")
    reqs = [
        request("free", repetitive(1, 3)[0], max_new_tokens=30),
        request("regex", [1, 520, 9531, 198], regex="[a-z]{3}[0-9]{3}[a-z ]{10,30}"),
    ]
    want = run(base, reqs)
    run(spec, reqs[:1])  # the free text's continuation, in the tree to draft from
    before = accepted(spec)
    with caplog.at_level(logging.ERROR):
        assert run(spec, reqs) == want
    assert accepted(spec) > before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert_pool_clean(spec)


def test_a_forbidden_draft_token_ends_the_draft(make: Make) -> None:
    c = make(None)
    backend = c.grammar.backend
    encode = c.tokenizer.encode

    def state(regex: str) -> GrammarState:
        compiled = backend.compile(GrammarSpec("regex", regex))
        return GrammarState(backend.matcher(compiled), backend, jump_forward=True)

    digits = [encode(d, add_special_tokens=False)[0] for d in "1234"]
    g = state("[0-9]{6}")
    assert g.accept_draft([digits[0], encode("x", add_special_tokens=False)[0], digits[1]]) == 1
    g.reject_draft(1)
    assert g.accept_draft(digits) == 4 and not g.is_terminated
    g = state("[0-9]{2}")
    assert g.accept_draft(digits) == 2 and g.is_terminated  # nothing after a complete output


def test_command_line_flags() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = engine_args_from(
        parser.parse_args(
            ["--speculative-algorithm", "radix", "--speculative-num-draft-tokens", "6"]
        )
    )
    assert args.spec_config == SpecConfig("radix", 6)
    assert engine_args_from(parser.parse_args([])).spec_config is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-algorithm", "eagle"])
