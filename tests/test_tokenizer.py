"""The tokenizer against transformers' (same GGUF), the chat template, and streaming decode."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.models.gguf import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    gguf_cache_path,
)
from radixlm.models.gguf_tokenizer import hf_tokenizer
from radixlm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "12345",
    "The year 2024 had 366 days; pi is 3.14159.",
    "def add(a, b):\n    return a + b  # sum\n",
    'x = {"key": [1, 2, 3]}\nprint(x["key"])',
    "naïve café, Grüße, 你好，世界",
    "emoji 🤗🎉 and family 👨\u200d👩\u200d👧 and flags 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>assistant\nSure.<|im_end|><|endoftext|>",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "\n\nnew\nlines\n\n\n",
    "\ttabs\tand\r\nCRLF",
    "don't won't I'll we've THEY'RE",
    "<not_special> <|im_start",
]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str) -> Tokenizer:
    return Tokenizer.load(smollm2_path)


@pytest.fixture(scope="module")
def hf_reference(smollm2_path: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(smollm2_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_special_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1  # <|im_start|>
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|>
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # no BOS
    assert tokenizer.is_special(0) and tokenizer.is_special(2)
    assert not tokenizer.is_special(tokenizer.encode("hi")[0])
    assert tokenizer.token_text(tokenizer.encode("Hello")[0]) == "Hello"
    assert tokenizer.token_text(2) == "<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer: Tokenizer, hf_reference: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_reference(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_reference: Any) -> None:
    for messages in (CONVERSATION, CONVERSATION[1:]):
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert ours == hf_reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert ours.endswith("<|im_start|>assistant\n")
        assert tokenizer.encode(ours, add_special_tokens=False) == hf_reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )


def test_hf_folder_tokenizer(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    folder_tokenizer = Tokenizer.load(str(tiny_model_dir))
    assert folder_tokenizer.vocab_size == 49152
    assert folder_tokenizer.eos_token_ids == (2,)
    assert folder_tokenizer.chat_template == tokenizer.chat_template
    for text in TEXTS:
        assert folder_tokenizer.encode(text) == tokenizer.encode(text)


def test_a_chat_template_file_replaces_the_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok = Tokenizer.load(str(tiny_model_dir), str(template))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == tok.special_tokens["bos_token"] + "[user] Hi\n[assistant] "
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ValueError, match=r"chat template '.*chat.jinja', line 2: "):
        Tokenizer.load(str(tiny_model_dir), str(template))


def test_eos_ids_are_merged_from_all_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50000, "eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 0]}))
    tok = Tokenizer.load(str(tmp_path))
    assert tok.eos_token_ids == (5, 0, 2)
    assert tok.vocab_size == 50000  # the model's output space, larger than the vocabulary


def test_add_bos_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    tok = Tokenizer.load(str(tmp_path))
    bos = tok.bos_token_id
    assert bos == 1
    assert tok.encode("hi") == [bos, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("<|im_start|>user") == tok.encode(
        "<|im_start|>user", add_special_tokens=False
    )
    assert tok.encode("") == [bos]


def test_gguf_add_bos_uses_a_post_processor(gguf_tokenizer_metadata: dict[str, Any]) -> None:
    backend = hf_tokenizer(gguf_tokenizer_metadata | {"tokenizer.ggml.add_bos_token": True})
    assert backend.encode("the").ids[0] == 1
    assert backend.encode("the", add_special_tokens=False).ids[0] != 1


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("smollm", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "ab 12345", ["ab", "Ġ", "123", "45"]),
        ("qwen2", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", "ab 12345", ["ab", "Ġ12345"]),
    ],
)
def test_gguf_pre_tokenizers(
    gguf_tokenizer_metadata: dict[str, Any], pre: str, text: str, pieces: list[str]
) -> None:
    backend = hf_tokenizer(gguf_tokenizer_metadata | {"tokenizer.ggml.pre": pre})
    assert backend.pre_tokenizer is not None
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] == pieces


# --- SentencePiece ("llama") GGUF vocabularies, against the sentencepiece library -------------

SPM_TEXTS = [
    *TEXTS,
    "The radix tree keeps the cache",
    "a  b   c    d",
    "Grüße 你好 Ωμέγα ☃",  # Greek and the snowman are not in the vocabulary: byte tokens
]
# Words of the training corpus (whole pieces and their merges), and a few more.
SPM_WORDS = [
    "The",
    "radix",
    "tree",
    "keeps",
    "the",
    "KV",
    "cache",
    "of",
    "every",
    "prefix",
    "that",
    "requests",
    "share,",
    "café",
    "Köln",
]
SPM_WORDS += ["", " ", "  ", "3.14159", "\n", "retraction"]


@pytest.fixture(scope="module")
def spm_gguf(sentencepiece_gguf: tuple[Any, dict[str, Any]]) -> tuple[Any, Tokenizer]:
    """The trained SentencePiece processor, and our tokenizer built from its GGUF metadata."""
    sp, metadata = sentencepiece_gguf
    backend = hf_tokenizer(metadata)
    return sp, Tokenizer(
        backend,
        vocab_size=backend.get_vocab_size(),
        bos_token_id=sp.bos_id(),
        eos_token_ids=(sp.eos_id(),),
        chat_template=None,
    )


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_gguf_sentencepiece_matches_sentencepiece(
    spm_gguf: tuple[Any, Tokenizer], text: str
) -> None:
    sp, tok = spm_gguf
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.sampled_from("aeinorst TRKC.,'\n\t0123456789éü你好Ω☃🙂"), max_size=40)
    | st.lists(st.sampled_from(SPM_WORDS), max_size=8).map(" ".join)
)
def test_gguf_sentencepiece_property(spm_gguf: tuple[Any, Tokenizer], text: str) -> None:
    sp, tok = spm_gguf
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 12) | st.integers(0, 399), max_size=30),
    chunk=st.integers(1, 3),
    skip_special_tokens=st.booleans(),
)
def test_gguf_sentencepiece_streaming_on_arbitrary_ids(
    spm_gguf: tuple[Any, Tokenizer], ids: list[int], chunk: int, skip_special_tokens: bool
) -> None:
    """Ids 0-2 are control tokens and 3-258 bytes (often not UTF-8): a window never cuts a run
    of byte tokens, so the stream is always a prefix of the full decode."""
    _, tok = spm_gguf
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    for i in range(0, len(ids), chunk):
        detok.push(ids[i : i + chunk])
        assert full.startswith(detok.text)
    detok.flush()
    assert detok.text == full


def test_gguf_sentencepiece_special_tokens(spm_gguf: tuple[Any, Tokenizer]) -> None:
    sp, tok = spm_gguf
    bos, eos = sp.bos_id(), sp.eos_id()
    # BOS by default (llama.cpp's rule for SentencePiece files that carry no add_bos flag).
    assert tok.backend.encode("Hi").ids == [bos, *sp.encode("Hi")]
    # Special tokens in the text are parsed whole, and text after one gets its own space prefix,
    # as llama.cpp does: " there" after </s> is what sentencepiece makes of " there" alone.
    ids = tok.encode("<s>Hi</s> there", add_special_tokens=False)
    assert ids == [bos, *sp.encode("Hi"), eos, *sp.encode(" there")]
    # Decoding drops only the space prefix in front of the whole text.
    assert tok.decode(ids) == "Hi  there"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Hi</s>  there"


def test_gguf_sentencepiece_without_space_prefix(
    make_sentencepiece_gguf: Callable[..., tuple[Any, dict[str, Any]]],
) -> None:
    sp, metadata = make_sentencepiece_gguf(add_space_prefix=False)
    backend = hf_tokenizer(metadata)
    for text in SPM_TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text)
        assert backend.decode(ids) == sp.decode(ids) == text


def test_engine_on_a_sentencepiece_gguf(
    tmp_path: Path,
    tmp_cache_dir: Path,
    make_tiny_gguf: Callable[..., Any],
    sentencepiece_gguf: tuple[Any, dict[str, Any]],
) -> None:
    from radixlm import Engine

    sp, metadata = sentencepiece_gguf
    path, _, _ = make_tiny_gguf(tmp_path / "spm.gguf", tokenizer=metadata)
    tok = Tokenizer.load(str(path))
    assert tok.encode("Hello world") == [sp.bos_id(), *sp.encode("Hello world")]
    assert tok.eos_token_ids == (sp.eos_id(),)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<s>[user] Hi</s>"
    with Engine(model_path=str(path), max_total_tokens=256) as engine:
        out = engine.generate("Hello world", {"max_new_tokens": 8, "temperature": 0})
        assert out["meta_info"]["prompt_tokens"] == 1 + len(sp.encode("Hello world"))
        assert out["text"] == tok.decode(out["output_ids"])
        engine_sp = engine.generate(
            input_ids=[[sp.bos_id(), *sp.encode("Hello world")]],
            sampling_params={"max_new_tokens": 8, "temperature": 0},
        )
        assert engine_sp[0]["output_ids"] == out["output_ids"]
        # Structured output over this vocabulary: ▁ for spaces, byte tokens for Ω and ☃.
        for seed, regex in enumerate([r"[a-z]{1,5} [0-9]{3}", r"(yes|no), café", r"Ω[ab]{2}☃"]):
            params = {"max_new_tokens": 24, "temperature": 1.0, "sampling_seed": seed}
            out = engine.generate("Hello", {**params, "regex": regex})
            assert re.fullmatch(regex, out["text"]), out["text"]
            assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_tokenizer_from_gguf_converts_only_metadata(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any]
) -> None:
    path, _, _ = make_tiny_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.load(str(path))
    folder = gguf_cache_path(path)
    assert all((folder / name).is_file() for name in (*CONFIG_FILES, *TOKENIZER_FILES))
    assert not (folder / WEIGHTS_FILE).exists()
    assert tok.encode(" the<|im_end|>") == [261, 2]  # the merged " the", then a control token
    assert tok.decode([261, 2]) == " the"
    assert tok.vocab_size == 263 and tok.eos_token_ids == (2,)
    assert Tokenizer.load(str(path)).encode("ab the") == tok.encode("ab the")  # from the cache


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("nope")
    with pytest.raises(ValueError):
        Tokenizer.load(str(not_gguf))


# --- chat template environment ------------------------------------------------------------------


def _with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(
        tokenizer.backend,
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        chat_template=template,
        special_tokens=tokenizer.special_tokens,
    )


def test_chat_template_helpers(tokenizer: Tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\n"
        "  {{ m['content'] | tojson }}|\n"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson(indent=None) }}{% endif %}"
        "{{ strftime_now('%Y') | length }}{{ eos_token }}{{ extra }}"
    )
    tok = _with_template(tokenizer, template)
    out = tok.apply_chat_template(
        [{"role": "user", "content": "<b>é</b>"}], tools=[{"name": "f"}], extra="!"
    )
    # trim_blocks + lstrip_blocks remove the newlines and indentation around {% %} tags only;
    # tojson keeps HTML characters and non-ASCII as they are.
    assert out == '<|im_start|>  "<b>é</b>"|\n[{"name": "f"}]4<|im_end|>!'
    with pytest.raises(jinja2.TemplateError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        _with_template(tokenizer, "{{ messages.__class__.__mro__ }}").apply_chat_template([])


def test_chat_template_generation_block(tokenizer: Tokenizer) -> None:
    tok = _with_template(
        tokenizer,
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
    )
    assert tok.apply_chat_template([{"role": "assistant", "content": "x"}]) == "x"


# --- incremental detokenization ------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int], chunk: int = 1, **kwargs: Any) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", [*TEXTS, "日本語のテキスト、絵文字😀😃😄、Ελληνικά, עברית"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_matches_full_decode(
    tokenizer: Tokenizer, text: str, skip_special_tokens: bool
) -> None:
    ids = tokenizer.encode(text)
    deltas = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-1] == ""  # valid text leaves nothing held back


def test_incremental_holds_back_partial_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🤗")
    assert len(ids) > 1 and "\ufffd" in tokenizer.token_text(ids[0])  # split across tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "🤗" and detok.text == "🤗"
    # A generation cut mid-character: flush releases the bytes as U+FFFD, as a full decode does.
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[:1]) == ""
    assert detok.flush() == tokenizer.decode(ids[:1]) == "\ufffd"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), chunk=st.integers(1, 4))
def test_incremental_property(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.encode(text)
    deltas = _stream(tokenizer, ids, chunk)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    # SmolLM2's vocabulary lacks a few bytes (0xF1, 0xC0, ...), so some text cannot round-trip.
    if "\ufffd" not in full:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30), chunk=st.integers(1, 3))
def test_incremental_property_on_arbitrary_ids(
    tokenizer: Tokenizer, ids: list[int], chunk: int
) -> None:
    """Arbitrary ids may be invalid UTF-8; the text streamed so far stays a prefix of the full decode."""
    full = tokenizer.decode(ids)
    detok = IncrementalDetokenizer(tokenizer)
    for i in range(0, len(ids), chunk):
        detok.push(ids[i : i + chunk])
        assert full.startswith(detok.text)
    detok.flush()
    assert detok.text == full
