"""llguidance, the default grammar backend: lazy lexers, sub-millisecond compiles, parallel masks."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import llguidance as llg
import numpy as np
import torch

from radixlm.grammar.base import GrammarBackend, GrammarMatcher, GrammarSpec
from radixlm.grammar.llguidance_grammar import validate_grammar
from radixlm.tokenizer import Tokenizer


class LLGuidanceMatcher(GrammarMatcher):
    """A request's llguidance matcher."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, tokens: Sequence[int]) -> bool:
        """Consume tokens in order; False if the grammar rejects one."""
        return self.matcher.consume_tokens(list(tokens))

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens."""
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def num_valid(self, tokens: Sequence[int]) -> int:
        """How many of tokens the grammar would accept now."""
        return self.matcher.validate_tokens(list(tokens))

    def forced_bytes(self) -> bytes:
        """llguidance's forced bytes: the fast-forward tokens' text and the tail they hold back."""
        return self.matcher.compute_ff_bytes()

    def forced_tokens(self) -> list[int]:
        """llguidance's fast-forward tokens: canonical, and stopping short of a mergeable tail."""
        return self.matcher.compute_ff_tokens()

    @property
    def is_terminated(self) -> bool:
        """Stopped: the grammar is complete and can only end (also true in an error state)."""
        return self.matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """Whether end-of-sequence is allowed now."""
        return self.matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """The first line of the matcher's error, if it is in its (permanent) error state."""
        error = self.matcher.get_error()
        return error.splitlines()[0] if error else None


class LLGuidanceBackend(GrammarBackend):
    """llguidance over the model's tokenizer; building it takes ~1 s (the token trie)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size or tokenizer.vocab_size
        hf = copy.copy(tokenizer.backend)  # a tokenizer.json may switch these on; encode must not
        hf.no_padding()
        hf.no_truncation()
        self.tokenizer = llg.LLTokenizer(
            hf.to_str(),
            n_vocab=max(self.vocab_size, tokenizer.vocab_size),
            eos_token=list(tokenizer.eos_token_ids) or None,
        )
        self._executor = llg.LLExecutor()
        self._words = (self.tokenizer.vocab_size + 31) // 32
        # numpy, not torch: a torch buffer made in inference mode cannot be filled outside it
        self._bitmask = np.empty((0, self._words), dtype=np.int32)

    def compile(self, spec: GrammarSpec) -> llg.LLMatcher:
        """A matcher at the start of the grammar, to be deep-copied per request."""
        matcher = llg.LLMatcher(self.tokenizer, validate_grammar(spec, self.tokenizer))
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind}: {matcher.get_error()}")
        return matcher

    def matcher(self, compiled: llg.LLMatcher) -> LLGuidanceMatcher:
        """A private copy of a compiled matcher (copies share the compiled lexer and parser)."""
        return LLGuidanceMatcher(compiled.deep_copy())

    def fill_masks(self, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
        """Fill all rows' bitmasks in parallel (llguidance's thread pool), then unpack to bool."""
        rows = len(matchers)
        if self._bitmask.shape[0] < rows:
            self._bitmask = np.empty(
                (max(rows, 2 * self._bitmask.shape[0]), self._words), dtype=np.int32
            )
        bitmask = self._bitmask[:rows]
        bitmask.fill(-1)  # rows without a grammar allow everything
        work = [(m.matcher, i) for i, m in enumerate(matchers) if isinstance(m, LLGuidanceMatcher)]
        self._executor.unsafe_compute_mask_ptr(work, bitmask.ctypes.data, self._words * 4, rows)
        # Bit j of word w is token 32w + j; on a little-endian machine that is bit j % 8 of byte
        # 4w + j // 8, so unpacking the bytes little-bit-first lists tokens in order (far faster
        # than shifting int32 words in torch).
        bits = np.unpackbits(
            bitmask.view(np.uint8), axis=1, count=self.vocab_size, bitorder="little"
        )
        return torch.from_numpy(bits).view(torch.bool)

    def retokenize(
        self, context: Sequence[int], tokens: Sequence[int], text: bytes = b""
    ) -> list[int] | None:
        """Tokenize the bytes of context + tokens + text, keeping context; context stops at a
        special token."""
        ll = self.tokenizer
        ctx = list(context)
        for i in range(len(ctx) - 1, -1, -1):
            if ll.is_special_token(ctx[i]):  # its text would tokenize as plain text
                ctx = ctx[i + 1 :]
                break
        full = ll.decode_bytes(ctx + list(tokens)) + text
        ids = ll.tokenize_bytes(full)
        if ids[: len(ctx)] != ctx or ll.decode_bytes(ids) != full:
            return None
        return ids[len(ctx) :]
