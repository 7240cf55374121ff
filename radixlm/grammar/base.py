"""The grammar-backend interface: compile a spec once, then one cheap matcher per request."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from radixlm.core.params import SamplingParams

if TYPE_CHECKING:  # the frontend (HTTP process) imports this package and must not load torch
    import torch

GrammarKind = Literal["regex", "json_schema", "ebnf"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request's output must match; hashable, so it keys the compiled-grammar cache."""

    kind: GrammarKind
    text: str  # the regex, the JSON schema as a JSON string, or the EBNF grammar

    @classmethod
    def from_params(cls, params: SamplingParams) -> GrammarSpec | None:
        """The spec of a request's sampling params; None when it has no grammar."""
        if params.regex is not None:
            return cls("regex", params.regex)
        if params.json_schema is not None:
            return cls("json_schema", params.json_schema)
        if params.ebnf is not None:
            return cls("ebnf", params.ebnf)
        return None

    def json_schema(self) -> dict[str, Any]:
        """The parsed schema of a json_schema spec; ValueError naming the problem if it is not one."""
        try:
            schema = json.loads(self.text)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if schema is True:  # the schema that allows every value
            return {}
        if not isinstance(schema, dict):
            raise ValueError(f"json_schema must be a JSON object, got {json.dumps(schema)[:40]}")
        return schema


class GrammarMatcher(ABC):
    """One request's position in its grammar.

    Every token the request outputs goes through `accept`, in order, so that the matcher's state
    is always "after the request's output_ids". Methods cost microseconds.
    """

    @abstractmethod
    def accept(self, tokens: Sequence[int]) -> bool:
        """Consume tokens in order; False if the grammar rejects one (then `error` says why)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens."""

    @abstractmethod
    def num_valid(self, tokens: Sequence[int]) -> int:
        """How many of tokens, in order, the grammar would accept now; consumes nothing."""

    @abstractmethod
    def forced_bytes(self) -> bytes:
        """All the text the grammar forces now (empty when nothing is): `forced_tokens` and the
        tail they hold back."""

    @abstractmethod
    def forced_tokens(self) -> list[int]:
        """The start of `forced_bytes` as the tokenizer would tokenize it, whatever follows.

        Tokens that could merge with whatever the model writes next are left out, so appending
        these never makes a non-canonical boundary on their right. Empty when nothing is forced.
        """

    @property
    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the output is complete: nothing but end-of-sequence may follow (or an error)."""

    @property
    @abstractmethod
    def is_accepting(self) -> bool:
        """Whether the output may end here: end-of-sequence is allowed now."""

    @property
    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed (a rejected token, a resource limit); None while it is fine."""


class GrammarBackend(ABC):
    """Compiles specs and fills next-token masks for one tokenizer."""

    vocab_size: int  # width of the masks, = the model's logits width

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """Compile spec into a reusable, immutable grammar; ValueError naming the problem."""

    @abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher, at the start of a grammar returned by `compile`."""

    @abstractmethod
    def fill_masks(self, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
        """Next-token masks of a batch: bool [B, vocab_size], True = allowed; None rows allow all."""

    @abstractmethod
    def retokenize(
        self, context: Sequence[int], tokens: Sequence[int], text: bytes = b""
    ) -> list[int] | None:
        """The tokenizer's own tokens for the text of `tokens` followed by `text`, read after
        `context`.

        None when that tokenization would also change a token of `context` (the text does not
        split cleanly at the start of `tokens`).
        """
