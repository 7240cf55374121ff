"""Steps that carry prefill chunks and decodes together, on a tiny model: greedy output must be
what each request gives alone, with chunked prefill cutting through prompts and the adaptive
prefill budget capping chunks while others decode; the slot invariant holds after every step."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.core.plan import ScheduledSeq, is_short_row
from radixlm.engine.core import EngineCore
from radixlm.scheduler.budget import MIN_PREFILL_TOKENS

Make = Callable[..., EngineCore]


@pytest.fixture
def make(make_core: Make) -> Make:
    return functools.partial(make_core, max_total_tokens=2048)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def request(rid: str, ids: list[int], new_tokens: int) -> GenerateRequest:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    return GenerateRequest(rid=rid, input_ids=ids, params=params)


def alone(make: Make, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy output of one request in an engine of its own (whole prefill, then decodes)."""
    core = make()
    core.add(request("x", ids, new_tokens))
    out: list[int] = []
    while core.has_work:
        out += [t for o in core.step() for t in o.new_ids]
    return out


Steps = list[tuple[int, int]]  # per forward: (prefill tokens, decode rows)


def run_with_arrivals(
    core: EngineCore, arrivals: dict[int, list[GenerateRequest]], monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, list[int]], Steps]:
    """Step until idle, adding arrivals[i] before step i; the invariant is checked after each."""
    steps: Steps = []
    real = core.runner.forward

    def forward(seqs: list[ScheduledSeq]) -> torch.Tensor:
        decodes = sum(1 for s in seqs if is_short_row(s) and len(s.new_ids) == 1)
        steps.append((sum(len(s.new_ids) for s in seqs) - decodes, decodes))
        return real(seqs)

    monkeypatch.setattr(core.runner, "forward", forward)
    outputs: dict[str, list[int]] = {}
    i = 0
    while core.has_work or any(k >= i for k in arrivals):
        for msg in arrivals.get(i, []):
            core.add(msg)
        for o in core.step():
            outputs.setdefault(o.rid, []).extend(o.new_ids)
        core.check_invariant()
        i += 1
    return outputs, steps


def test_mixed_steps_give_each_request_its_output_alone(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoders = {f"d{i}": prompt(9 + 5 * i, seed=i) for i in range(4)}
    late = {"p0": prompt(70, seed=10), "p1": prompt(41, seed=11)}
    core = make(chunked_prefill_size=24)
    arrivals = {
        0: [request(rid, ids, 12) for rid, ids in decoders.items()],
        4: [request(rid, ids, 5) for rid, ids in late.items()],
    }
    got, steps = run_with_arrivals(core, arrivals, monkeypatch)
    assert max(p + d for p, d in steps) <= 24
    assert sum(1 for p, d in steps if p and d) >= 3, steps  # chunks cut through, beside decodes
    assert any(p == 0 and d for p, d in steps)  # and decode-only steps (the decode pass)
    want = {rid: alone(make, ids, 12) for rid, ids in decoders.items()}
    want |= {rid: alone(make, ids, 5) for rid, ids in late.items()}
    assert got == want
    assert core.allocator.num_free + core.cache.total_size() == core.allocator.num_slots


def test_prefill_is_capped_while_decoding_and_whole_when_not(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A target below any step: chunks beside decodes shrink to the floor.
    core = make(chunked_prefill_size=512, target_itl_ms=0.001)
    long = prompt(400, seed=20)
    arrivals = {
        0: [request("d0", prompt(12, seed=21), 8), request("d1", prompt(20, seed=22), 8)],
        2: [request("long", long, 3)],
        12: [request("after", prompt(300, seed=23), 2)],
    }
    got, steps = run_with_arrivals(core, arrivals, monkeypatch)
    beside = [p for p, d in steps if d]
    assert beside and max(beside) <= MIN_PREFILL_TOKENS, steps
    assert (300, 0) in steps, steps  # nothing decoding: the whole prompt in one step
    assert got["long"] == alone(make, long, 3)
    fixed = make(chunked_prefill_size=512, target_itl_ms=0)
    got_fixed, steps_fixed = run_with_arrivals(fixed, arrivals, monkeypatch)
    assert any(p > MIN_PREFILL_TOKENS and d for p, d in steps_fixed), steps_fixed
    assert got_fixed == got
