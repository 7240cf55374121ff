"""The llguidance backend on SmolLM2's tokenizer: masks, forced tokens, retokenization, errors.

References: llguidance's own per-matcher bitmask for the batched masks, and the Hugging Face
tokenizer's encode for every tokenization.
"""

from __future__ import annotations

import json
import subprocess
import sys

import llguidance as llg
import numpy as np
import pytest
import torch
from grammar_cases import PERSON_SCHEMA

from radixlm.grammar import GrammarSpec
from radixlm.grammar.llguidance_backend import LLGuidanceBackend, LLGuidanceMatcher
from radixlm.grammar.llguidance_grammar import validate_grammar
from radixlm.tokenizer import Tokenizer

EXTRA_COLUMNS = 64  # a model whose logits are wider than the tokenizer's vocabulary


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str) -> Tokenizer:
    return Tokenizer.load(smollm2_path)


@pytest.fixture(scope="module")
def backend(tokenizer: Tokenizer) -> LLGuidanceBackend:
    return LLGuidanceBackend(tokenizer, tokenizer.vocab_size + EXTRA_COLUMNS)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def person(backend: LLGuidanceBackend) -> LLGuidanceMatcher:
    return backend.matcher(backend.compile(GrammarSpec("json_schema", json.dumps(PERSON_SCHEMA))))


def test_forced_tokens_are_the_tokenizers_own(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    """Walking a canonical output: wherever the grammar forces text, its tokens are exactly the
    next tokens of the tokenizer's encoding, and (fixed separators) most of the structure is."""
    text = '{"name": "Bob", "age": 3, "city": "Paris"}'
    canonical = encode(tokenizer, text)
    m = person(backend)
    i = forced_count = 0
    while i < len(canonical):
        forced = m.forced_tokens()
        if forced:
            assert forced == canonical[i : i + len(forced)]
            forced_count += len(forced)
        else:
            forced = canonical[i : i + 1]
        assert m.accept(forced)
        i += len(forced)
    assert m.is_terminated and m.error is None
    assert forced_count == 9  # {"name":  "age":  "city": (three tokens each)


def test_forced_bytes_go_on_where_forced_tokens_stop(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    """Forced tokens hold back text that could merge with the value after it (` "` before a
    string: ` ""` and ` "$` are tokens; ` ` before an integer: ` -` is); forced bytes have it."""
    m = person(backend)
    assert m.forced_tokens() == encode(tokenizer, '{"name":')
    assert m.forced_bytes() == b'{"name": "'
    assert m.accept(encode(tokenizer, '{"name": "Bob",'))
    assert m.forced_tokens() == encode(tokenizer, ' "age":')
    assert m.forced_bytes() == b' "age": '
    joint = backend.retokenize(encode(tokenizer, ' "Bob",'), [], m.forced_bytes())
    assert joint == encode(tokenizer, ' "age": ') and joint[-1:] == encode(tokenizer, " ")


def test_masks_match_llguidance_per_matcher(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    a, b = person(backend), person(backend)
    a.accept(a.forced_tokens())
    b.accept(b.forced_tokens() + encode(tokenizer, ' "Bob",'))
    masks = backend.fill_masks([a, None, b])
    assert masks.dtype == torch.bool
    assert masks.shape == (3, tokenizer.vocab_size + EXTRA_COLUMNS)
    assert masks[1].all()
    for row, m in ((0, a), (2, b)):
        bits = np.unpackbits(
            np.frombuffer(m.matcher.compute_bitmask(), np.uint8), bitorder="little"
        )
        expected = torch.from_numpy(bits[: masks.shape[1]].astype(bool))
        assert torch.equal(masks[row], expected)
        assert not masks[row, tokenizer.vocab_size :].any()  # padding columns are never allowed
    # The row after ' "Bob",' allows ' "' (the next key's quote) and nothing that spells a value.
    assert masks[2, encode(tokenizer, ' "')[0]]
    assert masks[2].sum() < 10


def test_masks_grow_with_the_batch(backend: LLGuidanceBackend) -> None:
    one = backend.fill_masks([person(backend)])
    many = backend.fill_masks([person(backend) for _ in range(40)])
    assert many.shape[0] == 40
    assert torch.equal(many, one.expand(40, -1))
    assert one.sum() == 1  # only `{"` can start the object


def test_retokenize_merges_the_sampled_token_with_forced_text(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    """`"` sampled, then `, "age":` forced: the tokenizer spells the joint text `",` ` "` ..."""
    context = encode(tokenizer, '{"name": "Bob')[-2:]
    quote, comma = encode(tokenizer, '"'), encode(tokenizer, ', "age":')
    joint = backend.retokenize(context, quote + comma)
    assert joint == encode(tokenizer, '", "age":')
    assert joint != quote + comma
    assert context + (joint or []) == encode(tokenizer, ' "Bob", "age":')


def test_retokenize_never_changes_the_context(
    backend: LLGuidanceBackend, tokenizer: Tokenizer
) -> None:
    bo, b = encode(tokenizer, "Bo"), encode(tokenizer, "b")
    assert len(bo) == len(b) == 1 and encode(tokenizer, "Bob") != bo + b
    assert backend.retokenize(bo, b) is None  # "Bob" is one token: the text does not split there
    im_start = tokenizer.backend.token_to_id("<|im_start|>")
    assert im_start is not None
    context = [im_start, *encode(tokenizer, "assistant\n")]
    assert backend.retokenize(context, encode(tokenizer, '{"')) == encode(tokenizer, '{"')


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("regex", "a(b", "unclosed group"),
        ("regex", "[z-a]", "invalid regex"),
        ("json_schema", '{"type": ', "not valid JSON"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("json_schema", "false", "must be a JSON object"),
        ("json_schema", '{"type": "objekt"}', "objekt"),
        ("json_schema", '{"type": "string", "pattern": "a(b"}', "unclosed group"),
        ("ebnf", 'root ::= "a" item', "item"),
        ("ebnf", "root ::= (", "invalid ebnf"),
    ],
)
def test_bad_grammars_name_the_problem(kind: str, text: str, message: str) -> None:
    spec = GrammarSpec(kind, text)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message) as info:
        validate_grammar(spec)
    assert str(info.value).startswith(f"invalid {kind}") or kind == "json_schema"


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("regex", r"\d{4}-\d{2}-\d{2}"),
        ("json_schema", json.dumps(PERSON_SCHEMA)),
        ("json_schema", "true"),
        ("ebnf", 'root ::= "yes" | "no"'),
        ("ebnf", 'start: "a"+ "b"'),  # Lark is accepted too
    ],
)
def test_good_grammars_compile(backend: LLGuidanceBackend, kind: str, text: str) -> None:
    compiled = backend.compile(GrammarSpec(kind, text))  # type: ignore[arg-type]
    assert isinstance(compiled, llg.LLMatcher)
    assert backend.matcher(compiled).error is None


def test_rejected_token_sets_the_error(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    m = backend.matcher(backend.compile(GrammarSpec("regex", "[0-9]+")))
    assert m.num_valid(encode(tokenizer, "12x")) == 2
    assert not m.accept(encode(tokenizer, "x"))
    assert m.error is not None and "\n" not in m.error
    assert m.is_terminated


def test_rollback_restores_the_state(backend: LLGuidanceBackend, tokenizer: Tokenizer) -> None:
    m = backend.matcher(backend.compile(GrammarSpec("regex", "(ab|cd)e")))
    a = encode(tokenizer, "a")
    assert m.accept(a) and m.forced_tokens() == encode(tokenizer, "be")
    m.rollback(1)
    assert m.forced_tokens() == [] and m.num_valid(encode(tokenizer, "c")) == 1


def test_the_frontend_checks_grammars_without_torch() -> None:
    """The HTTP process validates grammars and must stay free of torch."""
    code = (
        "import sys\n"
        "from radixlm.grammar import GrammarSpec, validate_spec\n"
        "validate_spec(GrammarSpec('json_schema', '{\"type\": \"object\"}'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
