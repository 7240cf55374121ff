"""The prefill budget against a known step cost: a step of d seconds of decodes plus b seconds
per prefill token must be capped at (target - d) / b tokens while decoding."""

from __future__ import annotations

import pytest

from radixlm.engine.args import EngineArgs
from radixlm.scheduler.budget import MIN_PREFILL_TOKENS, PrefillBudget


def drive(budget: PrefillBudget, decode_s: float, token_s: float, steps: int) -> None:
    """Alternate decode-only steps and steps of whatever prefill the budget allows."""
    for _ in range(steps):
        budget.plan(0, decoding=True)
        budget.observe(decode_s)
        n = budget.tokens(decoding=True)
        budget.plan(n, decoding=True)
        budget.observe(decode_s + token_s * n)


def test_while_decoding_the_cap_keeps_the_step_at_the_target() -> None:
    budget = PrefillBudget(chunk=2048, target_s=0.5)
    budget.plan(2048, decoding=False)  # a prefill before anything decodes
    budget.observe(2048 * 0.001)
    assert budget.tokens(decoding=True) == 500  # no decode step seen yet: the target over b
    drive(budget, decode_s=0.1, token_s=0.001, steps=40)
    assert budget.tokens(decoding=True) == pytest.approx(400, abs=2)  # (0.5 - 0.1) / 0.001
    assert budget.tokens(decoding=False) == 2048  # nothing decodes: whole chunks again


def test_the_cap_stays_within_the_floor_and_the_chunk() -> None:
    slow = PrefillBudget(chunk=2048, target_s=0.5)
    drive(slow, decode_s=0.6, token_s=0.001, steps=10)  # the decodes alone exceed the target
    assert slow.tokens(decoding=True) == MIN_PREFILL_TOKENS
    fast = PrefillBudget(chunk=1024, target_s=0.5)
    drive(fast, decode_s=0.01, token_s=1e-6, steps=10)
    assert fast.tokens(decoding=True) == 1024


def test_without_a_target_or_a_measurement_chunks_are_whole() -> None:
    assert PrefillBudget(chunk=1024, target_s=0.5).tokens(decoding=True) == 1024
    fixed = PrefillBudget(chunk=1024, target_s=None)
    drive(fixed, decode_s=0.1, token_s=0.01, steps=5)
    assert fixed.tokens(decoding=True) == 1024


def test_tiny_steps_do_not_move_the_estimate() -> None:
    budget = PrefillBudget(chunk=2048, target_s=0.5)
    budget.plan(1000, decoding=False)
    budget.observe(1.0)
    budget.plan(3, decoding=False)  # a 3-token step that took long (noise): ignored
    budget.observe(5.0)
    assert budget.token_s == pytest.approx(0.001)


def test_a_negative_target_is_refused_and_the_default_is_off() -> None:
    with pytest.raises(ValueError, match="target_itl_ms must be >= 0"):
        EngineArgs(target_itl_ms=-1)
    assert EngineArgs().target_itl_ms == 0
