"""Grammars in the engine step, on a tiny random-weight model (a fast fuzzer: it picks arbitrary
allowed tokens), stepped by hand with the slot invariant checked every step; and a request's
GrammarState (jump-forward, drafts) on its own."""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.core.messages import GenerateRequest, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.core.request import Req
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.grammar import GrammarSpec
from radixlm.grammar.base import GrammarBackend, GrammarMatcher
from radixlm.grammar.manager import GrammarCache, GrammarManager
from radixlm.grammar.state import GrammarState
from radixlm.scheduler.scheduler import Scheduler
from radixlm.tokenizer import Tokenizer

PROMPT = [1, 520, 9531, 198]  # <|im_start|>assistant\n
SMALL = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["alpha", "beta"]},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "tag", "ok"],
    "additionalProperties": False,
}
# llguidance's forced tokens hold back the forced ` "` (` "$` and ` "(` are tokens too); it is fed
# as a draft, which the model keeps (then writes `$` or `(`) or replaces with ` "$` or ` "(`.
PRICE = r'Price: "(\$|\()[0-9]{1,3}"'
# After each sampled letter, ` is one of the letters,` is forced and ` ` (` a`, ` b`...) held back.
PHRASE = " is one of the letters, "
LETTERS = f"((a|b|c|d|e|f|g|h)({PHRASE})){{6}}"


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path) -> EngineCore:
    return EngineCore(
        EngineArgs(model_path=str(tiny_model_dir), max_total_tokens=512, random_seed=0)
    )


def variant(
    core: EngineCore,
    grammar: GrammarManager | None = None,
    pool: int | None = None,
    **config: Any,
) -> EngineCore:
    """The shared core with a fresh scheduler (its config changed by `config`, over a corner of
    the KV pool of `pool` slots if given) and optionally another grammar manager."""
    s = core.scheduler
    allocator = s.allocator if pool is None else SlotAllocator(pool)
    cache = s.cache if pool is None else RadixCache(allocator)
    c = copy.copy(core)
    c.scheduler = Scheduler(cache, allocator, s.tokenizer, replace(s.config, **config))
    c.grammar = grammar or core.grammar
    return c


@pytest.fixture
def sched(core: EngineCore) -> EngineCore:
    """A fresh scheduler over the shared model; the grammar cache is shared too (as in a server)."""
    return variant(core)


def grammar_state(core: EngineCore, spec: GrammarSpec) -> GrammarState:
    backend = core.grammar.backend
    return GrammarState(backend.matcher(backend.compile(spec)), backend, jump_forward=True)


def apply(req: Req, edit: tuple[int, list[int]]) -> list[int]:
    """Apply a GrammarState edit to req's output; returns the new tail."""
    keep, tail = edit
    req.output_ids[keep:] = tail
    return tail


def request(rid: str, prompt: list[int] = PROMPT, **params: Any) -> GenerateRequest:
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 48, **params})
    return GenerateRequest(rid=rid, input_ids=list(prompt), params=p)


def run(
    s: EngineCore, max_steps: int = 300, after_step: Callable[[], None] = lambda: None
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    ids: dict[str, list[int]] = {}
    reasons: dict[str, Any] = {}
    for _ in range(max_steps):
        if not s.has_work:
            return ids, reasons
        with torch.inference_mode():
            outs: list[TokenOutput] = s.step()
        s.check_invariant()
        after_step()
        for o in outs:
            assert o.rid not in reasons, f"{o.rid} produced output after it finished"
            ids.setdefault(o.rid, []).extend(o.new_ids)
            if o.finish_reason is not None:
                reasons[o.rid] = o.finish_reason.to_dict()
    pytest.fail("the scheduler is still busy")


def text(s: EngineCore, ids: list[int]) -> str:
    return s.tokenizer.decode(ids)


def encode(s: EngineCore, text: str) -> list[int]:
    return s.tokenizer.encode(text, add_special_tokens=False)


def test_cache_drops_the_least_recently_used() -> None:
    cache = GrammarCache(capacity=2)
    a, b, c = (GrammarSpec("regex", x) for x in "abc")
    cache.put(a, 1)
    cache.put(b, 2)
    assert cache.get(a) == 1  # a is now the most recent
    cache.put(c, 3)
    assert cache.get(b) is None and cache.get(a) == 1 and cache.get(c) == 3 and len(cache) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_outputs_match_their_grammars(sched: EngineCore, temperature: float) -> None:
    """Arbitrary allowed tokens, in one mixed batch with a request that has no grammar."""
    specs: dict[str, dict[str, Any]] = {
        "json": {"json_schema": json.dumps(SMALL)},
        "date": {"regex": r"\d{4}-\d{2}-\d{2}"},
        "choice": {"ebnf": 'root ::= "The answer is " ("yes" | "no") "."'},
        "free": {},
    }
    for i, (rid, spec) in enumerate(specs.items()):
        sched.add(request(rid, temperature=temperature, sampling_seed=i, **spec))
    ids, reasons = run(sched)
    jsonschema.validate(json.loads(text(sched, ids["json"])), SMALL)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text(sched, ids["date"]))
    assert re.fullmatch(r"The answer is (yes|no)\.", text(sched, ids["choice"]))
    for rid in ("json", "date", "choice"):
        assert reasons[rid] == {"type": "stop", "matched": None}
    assert reasons["free"]["type"] == "length"


def test_forced_output_needs_no_forward_pass(sched: EngineCore) -> None:
    sched.add(request("fixed", regex=r"Hello, world! This text is entirely forced\."))
    before = sched.scheduler.num_forward_passes
    ids, reasons = run(sched)
    assert sched.scheduler.num_forward_passes == before
    assert text(sched, ids["fixed"]) == "Hello, world! This text is entirely forced."
    assert ids["fixed"] == sched.tokenizer.encode(
        text(sched, ids["fixed"]), add_special_tokens=False
    )
    assert reasons["fixed"]["type"] == "stop"


def test_jumps_longer_than_a_chunk_are_fed_in_chunks(core: EngineCore) -> None:
    small = variant(core, chunked_prefill_size=6)
    pattern = r"(red|blue) is the colour of the sky over the sea at noon; (yes|no) it is\."
    for i in range(3):
        small.add(request(f"r{i}", regex=pattern, temperature=1.0, sampling_seed=i))
    ids, reasons = run(small)
    for i in range(3):
        assert re.fullmatch(pattern, text(small, ids[f"r{i}"]))
        assert reasons[f"r{i}"]["type"] == "stop"


def letters_prefix(out: str) -> bool:
    """Whether out starts a match of LETTERS."""
    letters = out[:: len(PHRASE) + 1]
    return (
        set(letters) <= set("abcdefgh") and out == "".join(c + PHRASE for c in letters)[: len(out)]
    )


@pytest.mark.parametrize(("pattern", "chunk"), [(PRICE, 6), (LETTERS, 7)])
def test_a_chunk_never_stops_just_before_a_draft(
    core: EngineCore, pattern: str, chunk: int
) -> None:
    """`Price: "` after the 4-token prompt, `a is one of the letters, ` after a letter: the chunk
    that would end one token short takes the draft too, since verifying it needs the logits of
    the token before it."""
    small = variant(core, chunked_prefill_size=chunk)
    small.add(request("r", regex=pattern, temperature=1.0, sampling_seed=0, max_new_tokens=24))
    ids, reasons = run(small)
    out = text(small, ids["r"])
    if pattern == PRICE:
        assert re.fullmatch(PRICE, out) and reasons["r"]["type"] == "stop"
    else:
        assert letters_prefix(out) and reasons["r"] == {"type": "length", "length": 24}


def test_max_new_tokens_cuts_a_jump(sched: EngineCore) -> None:
    sched.add(request("cut", json_schema=json.dumps(SMALL), max_new_tokens=2))
    ids, reasons = run(sched)
    assert ids["cut"] == sched.tokenizer.encode('{"id', add_special_tokens=False)
    assert reasons["cut"] == {"type": "length", "length": 2}


def test_jump_forward_off_feeds_one_token_per_step(core: EngineCore) -> None:
    off = GrammarManager(core.tokenizer, jump_forward=False)
    off.cache, off._backend = core.grammar.cache, core.grammar.backend  # share the built backend
    plain = variant(core, grammar=off)
    plain.add(request("fixed", regex="Hello, world!"))
    ids, _ = run(plain)
    assert text(plain, ids["fixed"]) == "Hello, world!"
    assert plain.scheduler.num_forward_passes == len(ids["fixed"])


@pytest.mark.parametrize("kind", ["logprobs", "stop"])
def test_logprob_and_stop_string_requests_do_not_jump(sched: EngineCore, kind: str) -> None:
    msg = request("r", regex="Hello, world!", stop=["xyz"] if kind == "stop" else [])
    sched.add(
        GenerateRequest(msg.rid, msg.input_ids, msg.params, return_logprob=kind == "logprobs")
    )
    ids, _ = run(sched)
    assert text(sched, ids["r"]) == "Hello, world!"
    assert sched.scheduler.num_forward_passes == len(ids["r"])


def test_a_grammar_the_frontend_did_not_check_aborts_only_its_request(sched: EngineCore) -> None:
    sched.add(request("bad", regex="a(b"))
    sched.add(request("good", regex="[0-9]{3}"))
    ids, reasons = run(sched)
    assert reasons["bad"]["type"] == "abort" and "unclosed group" in reasons["bad"]["message"]
    assert re.fullmatch("[0-9]{3}", text(sched, ids["good"]))


class PoisonedBackend(GrammarBackend):
    """The shared backend, except that filling a mask for a batch holding a matcher of the
    poisoned grammar fails (as a backend bug on one request's grammar would)."""

    def __init__(self, inner: GrammarBackend, poison: str) -> None:
        self.inner, self.poison, self.vocab_size = inner, poison, inner.vocab_size
        self.poisoned: set[int] = set()

    def compile(self, spec: GrammarSpec) -> Any:
        compiled = self.inner.compile(spec)
        return (compiled, spec.text == self.poison)

    def matcher(self, compiled: Any) -> GrammarMatcher:
        inner, poisoned = compiled
        m = self.inner.matcher(inner)
        if poisoned:
            self.poisoned.add(id(m))
        return m

    def fill_masks(self, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
        if any(id(m) in self.poisoned for m in matchers):
            raise RuntimeError("mask fill failed")
        return self.inner.fill_masks(matchers)

    def retokenize(
        self, context: Sequence[int], tokens: Sequence[int], text: bytes = b""
    ) -> list[int] | None:
        return self.inner.retokenize(context, tokens, text)


def test_a_mask_error_ends_only_the_request_it_belongs_to(core: EngineCore) -> None:
    backend = PoisonedBackend(core.grammar.backend, "[a-z]{40}")
    manager = GrammarManager(core.tokenizer, backend_factory=lambda t, v: backend)
    alone = variant(core)
    alone.add(request("good", regex="[0-9]{3}"))
    alone.add(request("free", max_new_tokens=6))
    want, _ = run(alone)
    mixed = variant(core, grammar=manager)
    mixed.add(request("bad", regex="[a-z]{40}"))
    mixed.add(request("good", regex="[0-9]{3}"))
    mixed.add(request("free", max_new_tokens=6))
    ids, reasons = run(mixed)
    assert reasons["bad"]["type"] == "abort" and "mask fill failed" in reasons["bad"]["message"]
    assert ids["good"] == want["good"] and ids["free"] == want["free"]
    assert reasons["good"]["type"] == "stop" and reasons["free"]["type"] == "length"


def test_abort_while_compiling(core: EngineCore) -> None:
    gate = threading.Event()

    def slow_backend(tokenizer: Tokenizer, vocab_size: int | None) -> GrammarBackend:
        assert gate.wait(timeout=30)
        return core.grammar.backend

    manager = GrammarManager(core.tokenizer, backend_factory=slow_backend)
    gated = variant(core, grammar=manager)
    gated.add(request("slow", regex="[a-z]+"))
    gated.add(request("plain"))
    with torch.inference_mode():
        gated.step()  # the plain request runs while the grammar compiles
    assert gated.has_work and manager.num_pending == 1
    gated.abort("slow", "changed my mind")
    gate.set()
    ids, reasons = run(gated)
    assert reasons["slow"] == {"type": "abort", "message": "changed my mind"}
    assert reasons["plain"]["type"] == "length" and ids["slow"] == []


@pytest.mark.parametrize("pool", [80, 120])
def test_jump_forward_on_a_full_pool_retracts_instead_of_stalling(
    core: EngineCore, pool: int
) -> None:
    """Each sampled letter brings a tail of forced tokens, fed as one extend that needs several
    free slots at once. With the pool full of such tails no decode is left to trigger a
    retraction; the scheduler must still send someone back rather than spin on empty steps."""
    tight = variant(core, pool=pool)  # a corner of the runner's KV pool
    # LETTERS is 48 tokens: cut at 40, as admission assumes 28
    for i in range(6):
        prompt = torch.randint(3, 49000, (12,), generator=torch.Generator().manual_seed(i)).tolist()
        tight.add(
            request(
                f"r{i}", prompt, regex=LETTERS, temperature=1.0, sampling_seed=i, max_new_tokens=40
            )
        )
    retracted_with_draft: list[str] = []

    def note_retracted_with_draft() -> None:
        retracted_with_draft.extend(
            r.rid for r in tight.scheduler.waiting if r.admitted and r.num_draft
        )

    ids, reasons = run(tight, max_steps=500, after_step=note_retracted_with_draft)
    assert tight.scheduler.num_retractions > 0 and retracted_with_draft
    for i in range(6):
        assert letters_prefix(text(tight, ids[f"r{i}"]))
        assert reasons[f"r{i}"] == {"type": "length", "length": 40}


def test_jump_retokenizes_the_sampled_token(core: EngineCore) -> None:
    """A model that samples `"` where `",` exists: the jump replaces it with the tokenizer's own
    tokens for `", "age":`, and the matcher follows the replacement. What llguidance's forced
    tokens hold back (` "` before a string, ` ` before an integer) is appended as a draft."""
    s = core
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    spec = GrammarSpec("json_schema", json.dumps(schema))
    req = Req("r", list(PROMPT), SamplingParams(max_new_tokens=64, json_schema=spec.text), (2,))
    req.grammar = state = grammar_state(core, spec)
    req.output_ids = state.start(req, 2048)
    assert req.output_ids == encode(s, '{"name": "') and state.num_draft == 1
    assert req.output_ids[:-1] == encode(s, '{"name":')  # what is sent: all but the draft
    (quote,) = encode(s, ' "')
    bob, close = encode(s, "Bob"), encode(s, '"')
    apply(req, state.settle(req, [quote, bob[0]], 2048))  # the model writes the draft: kept
    assert state.num_draft == 0 and req.output_ids == encode(s, '{"name": "') + bob[:1]
    for token in bob[1:] + close:
        new = apply(req, state.settle(req, [token], 2048))
    assert new[: len(new) - state.num_draft] == encode(s, '", "age":')
    assert req.output_ids == encode(s, '{"name": "Bob", "age": ') and state.num_draft == 1
    rest = encode(s, "42}")
    assert state.matcher.num_valid(rest) == len(rest)  # the matcher follows the replaced tokens


def test_a_rejected_draft_leaves_the_output_and_the_matcher(core: EngineCore) -> None:
    s = core
    spec = GrammarSpec("regex", PRICE)
    req = Req("r", list(PROMPT), SamplingParams(max_new_tokens=16, regex=PRICE), (2,))
    req.grammar = state = grammar_state(core, spec)
    req.output_ids = state.start(req, 2048)
    assert req.output_ids == encode(s, 'Price: "') and state.num_draft == 1
    (dollar,) = encode(s, ' "$')
    (five,) = encode(s, "5")
    # The model writes ` "$` where the draft ` "` was fed: the sample after the draft is moot.
    assert apply(req, state.settle(req, [dollar, five], 2048)) == [dollar]
    assert req.output_ids == encode(s, "Price:") + [dollar] and state.num_draft == 0
    rest = encode(s, '5"')
    assert state.matcher.num_valid(rest) == len(rest)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_are_kept_or_replaced_and_their_slots_freed(
    sched: EngineCore, temperature: float
) -> None:
    """Each request's forced ` "` is fed as a draft; the model keeps it or writes ` "$` / ` "(`
    there instead. Either way the output matches and every slot has one owner after each step."""
    for i in range(8):
        sched.add(request(f"r{i}", regex=PRICE, temperature=temperature, sampling_seed=i))
    ids, reasons = run(sched)
    quote, merged = encode(sched, ' "'), set(encode(sched, ' "$') + encode(sched, ' "('))
    kept = replaced = 0
    for i in range(8):
        out = ids[f"r{i}"]
        assert re.fullmatch(PRICE, text(sched, out))
        assert reasons[f"r{i}"] == {"type": "stop", "matched": None}
        assert out[:2] == encode(sched, "Price:")
        kept += out[2:3] == quote
        replaced += out[2] in merged
    assert kept + replaced == 8
    if temperature > 0:
        assert kept and replaced, (kept, replaced)


@pytest.mark.parametrize("limit", ["max_new_tokens", "context_len"])
def test_a_request_that_ends_on_a_draft_sends_it(core: EngineCore, limit: str) -> None:
    """Cut right after a draft, at the start (`Price: "`) or after a jump
    (`a is one of the letters, `): the draft is sent, as forced text tokenized as the output ends."""
    context_len = 24
    short = variant(core, context_len=context_len)
    lengths = {"start": 3, "jump": 8}
    for rid, n in lengths.items():
        if limit == "max_new_tokens":
            prompt, max_new_tokens = PROMPT, n
        else:  # newlines before the prompt, so that exactly n tokens fit
            prompt, max_new_tokens = [198] * (context_len - n - len(PROMPT)) + PROMPT, 48
        pattern = PRICE if rid == "start" else LETTERS
        short.add(request(rid, prompt, regex=pattern, max_new_tokens=max_new_tokens))
    ids, reasons = run(short)
    assert text(short, ids["start"]) == 'Price: "'
    assert re.fullmatch(f"[a-h]{PHRASE}", text(short, ids["jump"]))
    for rid, n in lengths.items():
        assert ids[rid] == encode(short, text(short, ids[rid])) and len(ids[rid]) == n
        assert reasons[rid] == {"type": "length", "length": n}


def test_an_aborted_request_drops_its_draft(sched: EngineCore) -> None:
    sched.add(request("r", regex=LETTERS, temperature=1.0, sampling_seed=0))
    sent: list[int] = []
    while not (sched.scheduler.running and sched.scheduler.running[0].num_draft):
        with torch.inference_mode():
            sent += [i for o in sched.step() for i in o.new_ids]
    sched.abort("r")
    (out,) = sched.step()
    sched.check_invariant()
    assert out.new_ids == [] and out.finish_reason is not None
    assert re.fullmatch(f"[a-h]{PHRASE.rstrip()}", text(sched, sent))


def test_poll_hands_back_compiled_and_cached_grammars(core: EngineCore) -> None:
    shared = core.grammar.backend
    manager = GrammarManager(core.tokenizer, backend_factory=lambda t, v: shared)
    req = Req("r", list(PROMPT), SamplingParams(regex="[a-z]{1,5}q"), (2,))
    manager.submit(req)
    t0 = time.perf_counter()
    ready: list[Req] = []
    while not ready:
        ready, failed = manager.poll(2048, block=True)
        assert not failed
    assert time.perf_counter() - t0 < 5 and req.grammar is not None
    assert manager.num_pending == 0
    manager.submit(Req("again", list(PROMPT), SamplingParams(regex="[a-z]{1,5}q"), (2,)))
    assert manager.poll(2048)[0][0].rid == "again"  # a cache hit is ready at once
