"""Budget-aware closing: the Closer's completions on llguidance matchers, and tight budgets in the
engine step on a tiny random-weight model (a fuzzer: it writes arbitrary allowed tokens, escapes
and half characters included), stepped by hand with the slot invariant checked every step.
Every document is checked against its schema with jsonschema."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from grammar_cases import PERSON_SCHEMA, SCHEMAS

from radixlm.core.messages import GenerateRequest, LogprobEntry
from radixlm.core.params import SamplingParams
from radixlm.core.request import Req
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.grammar import GrammarSpec
from radixlm.grammar.base import GrammarMatcher
from radixlm.grammar.closing import Closer
from radixlm.grammar.manager import GrammarManager
from radixlm.grammar.state import GrammarState
from radixlm.scheduler.scheduler import Scheduler

PROMPT = [1, 520, 9531, 198]  # <|im_start|>assistant\n
CASES: dict[str, dict[str, Any]] = {name: schema for name, (_, schema) in SCHEMAS.items()} | {
    "free": {"type": "object"},  # response_format json_object
    "object_array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "a": {"type": "string"},
                        "b": {"type": "integer"},
                        "c": {"type": "boolean"},
                    },
                    "required": ["a", "b", "c"],
                },
            }
        },
        "required": ["items"],
    },
    "all_optional": {
        "type": "object",
        "properties": {
            "x": {"type": "string"},
            "y": {"type": "array", "items": {"type": "number"}},
            "z": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
    "constrained_strings": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "word": {"type": "string", "minLength": 3, "maxLength": 5},
        },
        "required": ["code", "word"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path) -> EngineCore:
    return EngineCore(
        EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=8192, random_seed=0)
    )


@pytest.fixture(scope="module")
def closer(core: EngineCore) -> Closer:
    return core.grammar.closer


def variant(core: EngineCore, jump_forward: bool = True, **config: Any) -> EngineCore:
    """The shared core with a fresh scheduler (its config changed by `config`) and, without
    jump-forward, a grammar manager of its own over the same backend."""
    s = core.scheduler
    c = copy.copy(core)
    c.scheduler = Scheduler(s.cache, s.allocator, s.tokenizer, replace(s.config, **config))
    if not jump_forward:
        c.grammar = GrammarManager(core.tokenizer, jump_forward=False)
        c.grammar.cache, c.grammar._backend = core.grammar.cache, core.grammar.backend
    return c


def matcher(core: EngineCore, schema: dict[str, Any]) -> GrammarMatcher:
    backend = core.grammar.backend
    return backend.matcher(backend.compile(GrammarSpec("json_schema", json.dumps(schema))))


def encode(core: EngineCore, text: str) -> list[int]:
    return core.tokenizer.encode(text, add_special_tokens=False)


def check(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


# ---- the completion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "prefix", "completion"),
    [
        (PERSON_SCHEMA, '{"name": "Al', '", "age": 0, "city": ""}'),
        (PERSON_SCHEMA, '{"name": "Al", "age": 1', ', "city": ""}'),
        (PERSON_SCHEMA, '{"name": "Al", "age": -', '0, "city": ""}'),
        (PERSON_SCHEMA, '{"name": "Al", "age": 3, "city": "Paris', '"}'),
        (SCHEMAS["numbers"][1], '{"price": 1.', '0, "stock": 0, "available": true}'),
        (SCHEMAS["numbers"][1], '{"price": 1, "stock": 3, "available": t', "rue}"),
        (SCHEMAS["array"][1], '{"title": "a", "tags": [', '""]}'),  # minItems 1
        (SCHEMAS["array"][1], '{"title": "a", "tags": ["x"', "]}"),
        (SCHEMAS["optional"][1], '{"title": "Dune"', "}"),
        (SCHEMAS["optional"][1], '{"title": "Dune", "au', 'thor": ""}'),
        (SCHEMAS["nested"][1], '{"customer": {"name": "Bo', '", "address": {"street": "", "city": ""}}}'),
        (CASES["free"], "{", "}"),
        (CASES["free"], '{"', '": 0}'),
        (CASES["free"], '{"a": [1, {"b": "c', '"}]}'),
        (CASES["free"], '{"a": "x\\', '""}'),  # an escaped quote, then the string's end
    ],
)  # fmt: skip
def test_completion_closes_the_most_first(
    core: EngineCore, closer: Closer, schema: dict[str, Any], prefix: str, completion: str
) -> None:
    m = matcher(core, schema)
    ids = encode(core, prefix)
    assert m.accept(ids)
    tokens = closer.complete(m, ids[-2:])
    assert tokens is not None and core.tokenizer.decode(tokens) == completion
    check(prefix + completion, schema)
    assert m.accept(tokens) and m.is_terminated  # the matcher was left where it was


def test_completion_is_the_tokenizers_own_tokens(core: EngineCore, closer: Closer) -> None:
    m = matcher(core, PERSON_SCHEMA)
    ids = encode(core, '{"name": "Al", "age": 3, "city": "Paris')
    assert m.accept(ids)
    assert closer.complete(m, ids[-2:]) == encode(core, '"}')  # one token, not `"` then `}`


def test_a_grammar_that_may_end_here_needs_nothing(core: EngineCore, closer: Closer) -> None:
    m = matcher(core, {"type": "integer"})
    assert m.accept(encode(core, "12"))
    assert closer.complete(m, []) == []  # end-of-sequence may follow, or the budget's end
    assert m.accept(encode(core, "3"))
    m = matcher(core, {"type": "integer"})
    assert m.accept(encode(core, "-"))
    assert closer.complete(m, []) == encode(core, "0")


def test_no_completion_past_the_bound(core: EngineCore, closer: Closer) -> None:
    m = matcher(core, {"type": "string", "minLength": 1000})
    assert m.accept(encode(core, '"'))
    before = m.forced_bytes(), m.num_valid(encode(core, 'ab"'))
    assert closer.complete(m, []) is None
    assert (m.forced_bytes(), m.num_valid(encode(core, 'ab"'))) == before


@pytest.mark.parametrize("name", list(CASES))
def test_random_prefixes_complete_to_valid_documents(
    core: EngineCore, closer: Closer, name: str
) -> None:
    """From wherever random allowed tokens lead (escapes, half characters, open numbers), the
    completion makes a document that validates, and leaves the matcher as it found it."""
    backend, schema = core.grammar.backend, CASES[name]
    for seed in range(24):
        rng = np.random.default_rng(seed)
        m, ids = matcher(core, schema), list(PROMPT)
        for _ in range(int(rng.integers(1, 40))):
            if m.is_terminated:
                break
            forced = m.forced_tokens()
            allowed = backend.fill_masks([m])[0].nonzero().flatten().tolist()
            allowed = [t for t in allowed if t not in core.tokenizer.eos_token_ids]
            step = forced or [int(rng.choice(allowed))]
            assert m.accept(step)
            ids += step
        if m.is_terminated:
            continue
        tokens = closer.complete(m, ids[-2:])
        assert tokens is not None, (name, seed, core.tokenizer.decode(ids[4:]))
        check(core.tokenizer.decode(ids[4:] + tokens), schema)
        assert m.accept(tokens) and m.is_terminated


# ---- in a request's grammar state ------------------------------------------------------------


def person_state(core: EngineCore, prefix: str, max_new_tokens: int) -> tuple[GrammarState, Req]:
    """A request with a closing grammar state after the output `prefix`."""
    spec = GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA))
    params = SamplingParams(max_new_tokens=max_new_tokens, json_schema=spec.text)
    req = Req("r", list(PROMPT), params, eos_ids=(2,))
    state = core.grammar.new_state(core.grammar.backend.compile(spec), close=True)
    req.output_ids = encode(core, prefix)
    assert state.matcher.accept(req.output_ids)
    return state, req


@pytest.mark.parametrize("room", [0, 1])
def test_a_token_that_leaves_no_room_is_replaced_by_the_ending(core: EngineCore, room: int) -> None:
    """`", "age": 0, "city": ""}` is 12 tokens: with 13 left, ` x` fits before it; with 12, the
    output ends there instead, complete."""
    prefix = '{"name": "Al'
    state, req = person_state(core, prefix, len(encode(core, prefix)) + 12 + room)
    keep, tail = state.settle(req, encode(core, " x"), 2048)
    assert keep == len(req.output_ids)
    if room:
        assert tail == encode(core, " x") and not state.closed
        return
    assert core.tokenizer.decode(tail) == '", "age": 0, "city": ""}' and len(tail) == 12
    assert state.closed and state.is_terminated and state.num_draft == 0
    check(prefix + core.tokenizer.decode(tail), PERSON_SCHEMA)


def test_the_context_length_is_a_budget_too(core: EngineCore) -> None:
    prefix = '{"name": "Al'
    state, req = person_state(core, prefix, max_new_tokens=1000)
    context_len = len(PROMPT) + len(req.output_ids) + 12
    keep, tail = state.settle(req, encode(core, " x"), context_len)
    assert state.closed and core.tokenizer.decode(tail) == '", "age": 0, "city": ""}'


# ---- in the engine ---------------------------------------------------------------------------


@dataclass
class Output:
    ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    reason: dict[str, Any] | None = None


def run(core: EngineCore, requests: Sequence[GenerateRequest]) -> dict[str, Output]:
    """Step until every request ends, checking the slot invariant after each step."""
    for r in requests:
        core.add(r)
    outputs: dict[str, Output] = {}
    with torch.inference_mode():
        for _ in range(2000):
            if not core.has_work:
                return outputs
            for o in core.step():
                out = outputs.setdefault(o.rid, Output())
                assert out.reason is None, f"{o.rid} produced output after it finished"
                out.ids += o.new_ids
                out.logprobs += o.output_logprobs
                if o.finish_reason is not None:
                    out.reason = o.finish_reason.to_dict()
            core.check_invariant()
    pytest.fail("the engine is still busy")


def shortest(core: EngineCore, schema: dict[str, Any]) -> int:
    """Tokens of the schema's shortest document."""
    tokens = core.grammar.closer.complete(matcher(core, schema), PROMPT[-2:])
    assert tokens is not None
    return len(tokens)


def tight_requests(
    core: EngineCore, seeds: int, **params: Any
) -> tuple[list[GenerateRequest], dict[str, tuple[dict[str, Any], int]]]:
    """Per case and seed, a budget from its shortest document's length to 15 tokens more."""
    requests, cases = [], {}
    for name, schema in CASES.items():
        least = shortest(core, schema)
        for seed in range(seeds):
            rid, budget = f"{name}-{seed}", least + seed % 16
            p = SamplingParams(
                max_new_tokens=budget,
                temperature=1.0,
                sampling_seed=seed,
                json_schema=json.dumps(schema),
                **params,
            )
            requests.append(GenerateRequest(rid, list(PROMPT), p))
            cases[rid] = (schema, budget)
    return requests, cases


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump", "plain"])
def test_tight_budgets_end_as_complete_documents(core: EngineCore, jump_forward: bool) -> None:
    """Every output validates; those the budget ended say `length` (the tokens they have, at
    most the budget), and most end on the budget's last token."""
    engine = variant(core, jump_forward)
    requests, cases = tight_requests(core, seeds=16)
    outputs = run(engine, requests)
    closed = on_budget = 0
    for rid, (schema, budget) in cases.items():
        out = outputs[rid]
        check(core.tokenizer.decode(out.ids), schema)
        assert out.reason is not None
        if out.reason["type"] == "length":
            assert out.reason["length"] == len(out.ids) <= budget
            closed += 1
            on_budget += len(out.ids) == budget
        else:
            assert out.reason == {"type": "stop", "matched": None}
    assert closed >= len(cases) // 3 and on_budget >= closed // 2


def test_closing_off_keeps_the_cut_output(core: EngineCore) -> None:
    requests, cases = tight_requests(core, seeds=8, close_on_length=False)
    outputs = run(core, requests)
    broken = 0
    for rid, (_, budget) in cases.items():
        out = outputs[rid]
        assert out.reason is not None
        if out.reason["type"] == "length":
            assert out.reason["length"] == len(out.ids) == budget
            try:
                json.loads(core.tokenizer.decode(out.ids))
            except json.JSONDecodeError:
                broken += 1
    assert broken >= len(cases) // 3


@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump", "plain"])
def test_closing_never_changes_an_output_that_fits(core: EngineCore, jump_forward: bool) -> None:
    """Wherever the model's own document fits its budget (the output without closing ends by
    the grammar), the output with closing is the same, token for token: closing replaces only
    what would not fit. Tight budgets (checks every step) and ample ones (checks skipped)."""
    engine = variant(core, jump_forward)
    requests, _ = tight_requests(core, seeds=16)
    for i, (name, schema) in enumerate(CASES.items()):
        if name in SCHEMAS or name == "constrained_strings":  # strings of at most 16 characters
            p = SamplingParams(
                max_new_tokens=400, temperature=1.0, sampling_seed=i, json_schema=json.dumps(schema)
            )
            requests.append(GenerateRequest(f"{name}-ample", list(PROMPT), p))
    on = run(engine, requests)
    off = run(
        engine, [replace(r, params=replace(r.params, close_on_length=False)) for r in requests]
    )
    fits = [rid for rid, out in off.items() if out.reason == {"type": "stop", "matched": None}]
    assert len(fits) >= len(requests) // 3
    assert all(f"{name}-ample" in fits for name in SCHEMAS)
    for rid in fits:
        assert on[rid].ids == off[rid].ids and on[rid].reason == off[rid].reason, rid


def test_a_forced_start_that_leaves_no_room_is_closed_at_once(core: EngineCore) -> None:
    """`{"type": "object"}` forces `{`; in one token the output is `{}`, without a forward."""
    before = core.scheduler.num_forward_passes
    p = SamplingParams(max_new_tokens=1, json_schema=json.dumps(CASES["free"]))
    out = run(core, [GenerateRequest("one", list(PROMPT), p)])["one"]
    assert core.tokenizer.decode(out.ids) == "{}" and out.reason == {"type": "length", "length": 1}
    assert core.scheduler.num_forward_passes == before


def test_the_context_ends_a_document_like_max_new_tokens(core: EngineCore) -> None:
    small = variant(core, context_len=len(PROMPT) + 24)
    requests = [
        GenerateRequest(
            f"r{seed}",
            list(PROMPT),
            SamplingParams(
                max_new_tokens=1000, temperature=1.0, sampling_seed=seed,
                json_schema=json.dumps(PERSON_SCHEMA),
            ),
        )
        for seed in range(8)
    ]  # fmt: skip
    outputs = run(small, requests)
    for out in outputs.values():
        check(core.tokenizer.decode(out.ids), PERSON_SCHEMA)
        assert out.reason is not None and len(out.ids) <= 24
    assert any(out.reason == {"type": "length", "length": 24} for out in outputs.values())


def test_logprobs_cover_a_closed_output(core: EngineCore) -> None:
    """Requests with logprobs decode one token at a time; the ending's tokens were written by
    the engine, not sampled, so their logprob is null."""
    requests, cases = tight_requests(core, seeds=4)
    outputs = run(core, [replace(r, return_logprob=True) for r in requests])
    closed = 0
    for rid, (schema, _) in cases.items():
        out = outputs[rid]
        assert out.reason is not None
        check(core.tokenizer.decode(out.ids), schema)
        assert [t for _, t in out.logprobs] == out.ids
        missing = [lp is None for lp, _ in out.logprobs]
        if out.reason["type"] == "length":
            closed += 1
            assert missing[-1]  # the ending's last token
        else:
            assert not any(missing)
    assert closed


@pytest.mark.parametrize(
    ("key", "spec"), [("regex", "[a-z]{200}"), ("ebnf", "root ::= [a-z]{200}")]
)
def test_regex_and_ebnf_are_cut_as_before(core: EngineCore, key: str, spec: str) -> None:
    p = SamplingParams.from_dict({"max_new_tokens": 6, "sampling_seed": 0, key: spec})
    out = run(core, [GenerateRequest("r", list(PROMPT), p)])["r"]
    assert out.reason == {"type": "length", "length": 6} and len(out.ids) == 6


@pytest.mark.parametrize(
    ("params", "closes"),
    [
        ({"json_schema": '{"type": "object"}'}, True),
        ({"json_schema": '{"type": "object"}', "close_on_length": False}, False),
        ({"regex": "[a-z]+"}, False),
        ({"ebnf": 'root ::= "a"+'}, False),
    ],
)
def test_closing_is_for_json_schemas_unless_turned_off(
    core: EngineCore, params: dict[str, Any], closes: bool
) -> None:
    req = Req("r", list(PROMPT), SamplingParams.from_dict(params), eos_ids=(2,))
    core.grammar.submit(req)
    for _ in range(500):
        ready, failed = core.grammar.poll(2048, block=True)
        if ready or failed:
            break
    assert ready == [req] and isinstance(req.grammar, GrammarState)
    assert (req.grammar.closer is not None) == closes
