"""A GGUF file's tokenizer, rebuilt as a Hugging Face `tokenizers` tokenizer that encodes as
llama.cpp does: byte-level BPE (`gpt2`: SmolLM2, Llama 3, Qwen) and SentencePiece BPE (`llama`:
Llama 2, Mistral)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

# llama.cpp's token types (llama_token_type).
_TOKEN_NORMAL = 1
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
# SentencePiece writes a space as this character (LOWER ONE EIGHTH BLOCK).
_SPM_SPACE = "\u2581"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_GPT2_PRE = ("default", "gpt2", "gpt-2")


def _adds_bos(metadata: dict[str, Any]) -> bool:
    """Whether encoding adds BOS: the file's flag, else llama.cpp's default (yes for a
    SentencePiece vocabulary, which older files do not flag)."""
    default = metadata.get("tokenizer.ggml.model") == "llama"
    return bool(metadata.get("tokenizer.ggml.add_bos_token", default))


def hf_tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face tokenizer_config.json dict: special tokens, BOS flag and chat template."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    arch = metadata.get("general.architecture")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _adds_bos(metadata),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "model_max_length": metadata.get(f"{arch}.context_length"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def hf_tokenizer(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's, for a byte-level BPE ("gpt2") or a
    SentencePiece ("llama": Llama 2, Mistral, TinyLlama, ...) vocabulary."""
    from tokenizers import AddedToken, processors

    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError("GGUF tokenizer has a token_type list of the wrong length")
    if kind == "gpt2":
        tok = _byte_level_bpe(metadata, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(metadata, tokens, types)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: byte-level BPE ('gpt2') and "
            "SentencePiece ('llama')"
        )

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_id in zip(tokens, types, strict=True)
            if kind_id in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)
        ]
    )
    # User-defined tokens (like <think>) are matched whole but, unlike control tokens, are text
    # the user should see, so decoding keeps them even when skipping special tokens.
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, types, strict=True)
            if kind_id == _TOKEN_USER_DEFINED
        ]
    )

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if _adds_bos(metadata) and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tok


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2-style BPE over bytes, split into words as the file's pre-tokenizer name says."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    pre_type = metadata.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            # llama.cpp (and Llama 3's tokenizer.json) look a whole word up before merging.
            ignore_merges=pre_type in _LLAMA3_PRE,
        )
    )
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre_type == "smollm":
        # Digits one by one, then GPT-2's regex: SmolLM2's own tokenizer.json and llama.cpp agree.
        tok.pre_tokenizer = pre.Sequence(
            [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]
        )
    elif pre_type in _LLAMA3_PRE:
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]
        )
    elif pre_type in _QWEN2_PRE:
        tok.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level]
        )
    else:
        if pre_type not in _GPT2_PRE:
            warnings.warn(
                f"unknown GGUF pre-tokenizer {pre_type!r}; splitting text like GPT-2",
                stacklevel=3,
            )
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], types: list[int]
) -> tokenizers.Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become U+2581 (one more in front of the
    text, and after each special token, unless the file says add_space_prefix is false), then
    the adjacent pair whose merged piece scores highest is merged until none is in the vocabulary;
    a character outside it is spelled with the <0xXX> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id of a duplicate
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(vocab, types, scores),
            unk_token=tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", _SPM_SPACE)
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape]) if space_prefix else escape
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _sentencepiece_merges(
    vocab: dict[str, int], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: every split of a normal piece into two
    normal pieces, the best-scoring merged piece first (its splits in vocabulary order)."""
    normal = {t: i for t, i in vocab.items() if types[i] == _TOKEN_NORMAL}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
