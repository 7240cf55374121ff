"""cache_salt and s.pin() in the frontend language, on a tiny random model in-process: a
program's salt keeps its K/V from any other salt; s.pin() keeps its context through eviction.
The reference is the same program unsalted: salts change what is shared, never the text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import radixlm as sgl
from radixlm.engine.engine import Engine
from radixlm.lang.backends.engine import EngineBackend

CONTEXT = "You are a careful agent. Tools: search, read, write. " * 2


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    with Engine(str(tiny_model_dir), max_total_tokens=400, context_length=256) as e:
        yield e


@pytest.fixture(autouse=True)
def fresh(engine: Engine) -> Iterator[None]:
    assert engine.flush_cache()
    yield
    engine.check_invariant()


@sgl.function
def agent(s: Any, question: str) -> None:
    s += CONTEXT + question
    s += sgl.gen("answer", max_tokens=3, temperature=0)


def answer(engine: Engine, salt: str | None) -> tuple[str, int]:
    state = agent.run(question=" Q: what next?", backend=EngineBackend(engine, cache_salt=salt))
    return state["answer"], state.get_meta_info("answer")["cached_tokens"]


def test_a_programs_salt_isolates_its_cache(engine: Engine) -> None:
    reference, _ = answer(engine, None)
    assert engine.flush_cache()
    runs = [answer(engine, salt) for salt in ("a", "a", "b", None, "b")]
    assert all(text == reference for text, _ in runs)
    cached = [n for _, n in runs]
    assert cached[0] == 0 and cached[1] > 0
    assert cached[2] == 0 and cached[3] == 0  # salt b and unsalted never saw salt a's prompt
    assert cached[4] == cached[1]


@sgl.function
def pin_context(s: Any) -> None:
    s += CONTEXT
    s["pin"] = s.pin(ttl_s=60)


def test_s_pin_keeps_the_context_through_eviction(engine: Engine) -> None:
    state = pin_context.run(backend=EngineBackend(engine, cache_salt="a"))
    pin = state["pin"]
    tokens = len(engine.tokenizer.encode(CONTEXT))
    assert pin["tokens"] == tokens
    for i in range(8):  # several pools' worth of other prompts
        engine.generate(input_ids=[50 + i] * 150, sampling_params={"max_new_tokens": 1})
    out = engine.generate(CONTEXT, sampling_params={"max_new_tokens": 1}, cache_salt="a")
    assert isinstance(out, dict) and out["meta_info"]["cached_tokens"] == tokens - 1
    out = engine.generate(CONTEXT, sampling_params={"max_new_tokens": 1}, cache_salt="b")
    assert isinstance(out, dict) and out["meta_info"]["cached_tokens"] == 0
    assert engine.unpin(pin["pin_id"])
