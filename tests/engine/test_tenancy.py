"""Cache salts, public prefixes and pins through the Engine on a tiny random model.

The reference is the same engine's unsalted greedy run: a salt changes only what is shared,
never the tokens; cached_tokens must show no K/V crossing salts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from radixlm.engine.engine import Engine
from radixlm.tenancy import PinQuotaExceeded

POOL = 160
PREFIX = list(range(10, 30))  # 20 tokens
GREEDY = {"max_new_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    with Engine(str(tiny_model_dir), max_total_tokens=POOL, context_length=128) as e:
        yield e


@pytest.fixture(autouse=True)
def fresh(engine: Engine) -> Iterator[None]:
    assert engine.flush_cache()
    yield
    engine.check_invariant()
    assert engine.flush_cache()  # ends pins too


def run(engine: Engine, ids: list[int], salt: str | None) -> dict[str, Any]:
    out = engine.generate(input_ids=ids, sampling_params=GREEDY, cache_salt=salt)
    assert isinstance(out, dict)
    return out


def test_isolation_table(engine: Engine) -> None:
    prompt = list(range(40, 70))
    reference = run(engine, prompt, None)["output_ids"]
    assert engine.flush_cache()
    cached = []
    for salt in ["a", "a", "b", None, "b", "a"]:
        out = run(engine, prompt, salt)
        assert out["output_ids"] == reference
        cached.append(out["meta_info"]["cached_tokens"])
        engine.check_invariant()
    full = len(prompt) - 1  # the last prompt token is always computed, for its logits
    assert cached == [0, full, 0, 0, full, full]


def test_public_prefix_is_shared_and_the_rest_isolated(engine: Engine) -> None:
    engine.add_public_prefix(input_ids=PREFIX)
    a, b = PREFIX + [90, 91, 92], PREFIX + [90, 91, 92]
    assert run(engine, a, "acme")["meta_info"]["cached_tokens"] == 0
    assert run(engine, b, "beta")["meta_info"]["cached_tokens"] == len(PREFIX)
    assert run(engine, a, "acme")["meta_info"]["cached_tokens"] == len(a) - 1
    other = [5] + PREFIX[1:] + [90, 91, 92]  # not starting with the public prefix
    assert run(engine, other, "acme")["meta_info"]["cached_tokens"] == 0
    assert run(engine, other, "beta")["meta_info"]["cached_tokens"] == 0
    assert run(engine, a, None)["meta_info"]["cached_tokens"] == len(PREFIX)


def flood(engine: Engine) -> None:
    """Fill the pool several times over with unrelated prompts, evicting whatever can be."""
    for i in range(6):
        run(engine, [100 + i] + list(range(200, 260)), None)


def test_a_pin_survives_eviction_until_its_ttl(engine: Engine) -> None:
    ids = list(range(300, 340))  # a quarter of the pool: the most one tenant may pin
    pin = engine.pin_prefix(input_ids=ids, ttl_s=60, cache_salt="acme")
    assert pin["tokens"] == len(ids)
    flood(engine)
    assert run(engine, ids, "acme")["meta_info"]["cached_tokens"] == len(ids) - 1
    assert run(engine, ids, "beta")["meta_info"]["cached_tokens"] == 0
    assert engine.unpin(pin["pin_id"]) and not engine.unpin(pin["pin_id"])
    flood(engine)
    assert run(engine, ids, "acme")["meta_info"]["cached_tokens"] == 0


def test_an_expired_pin_is_evictable_without_its_owner(engine: Engine) -> None:
    ids = list(range(300, 340))
    engine.pin_prefix(input_ids=ids, ttl_s=0.2, cache_salt="acme")
    time.sleep(0.3)  # nobody unpins: the TTL alone ends it
    flood(engine)
    assert run(engine, ids, "acme")["meta_info"]["cached_tokens"] == 0


def test_pin_quota_is_a_quarter_of_the_pool_per_tenant(engine: Engine) -> None:
    engine.pin_prefix(input_ids=list(range(300, 330)), ttl_s=60, cache_salt="acme")
    with pytest.raises(PinQuotaExceeded):  # 30 + 11 > 160 / 4
        engine.pin_prefix(input_ids=list(range(400, 411)), ttl_s=60, cache_salt="acme")
    assert engine.get_stats()["cached_tree_tokens"] == 30  # refused before any prefill
    engine.pin_prefix(input_ids=list(range(400, 411)), ttl_s=60, cache_salt="beta")
    with pytest.raises(ValueError):
        engine.pin_prefix(input_ids=[1, 2], ttl_s=-1)
    with pytest.raises(ValueError):
        run(engine, [1, 2], "")


def test_retraction_under_pressure_leaves_a_pin_whole(engine: Engine) -> None:
    ids = list(range(300, 340))
    prompts = [ids + [400 + i] for i in range(3)]  # 40 + 3 x 51 tokens > the pool of 160
    params = {"max_new_tokens": 50, "temperature": 0, "ignore_eos": True}
    reference = engine.generate(input_ids=prompts, sampling_params=params, cache_salt="acme")
    assert isinstance(reference, list)
    assert engine.flush_cache()
    retractions = engine.get_stats()["num_retractions"]
    pin = engine.pin_prefix(input_ids=ids, ttl_s=60, cache_salt="acme")
    outs = engine.generate(input_ids=prompts, sampling_params=params, cache_salt="acme")
    assert isinstance(outs, list)
    assert engine.get_stats()["num_retractions"] > retractions  # the pool did run short
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference]
    engine.check_invariant()
    flood(engine)
    assert run(engine, ids, "acme")["meta_info"]["cached_tokens"] == len(ids) - 1
    assert engine.unpin(pin["pin_id"])
