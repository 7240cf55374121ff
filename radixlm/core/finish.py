"""Why a request ended: SGLang's three finish reasons as one typed value."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class FinishKind(enum.Enum):
    """SGLang's finish types; the value is the JSON `type`."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class FinishReason:
    """A finish type plus its detail: the matched stop, the length reached, or the abort message."""

    kind: FinishKind
    # STOP: the stop token id, stop string or stop regex matched; None for a complete grammar.
    matched: int | str | None = None
    length: int = 0  # LENGTH: the tokens generated
    message: str = ""  # ABORT: why, for the client

    @classmethod
    def stop(cls, matched: int | str | None) -> FinishReason:
        """Ended by a stop token, string or regex (or, with None, a complete grammar)."""
        return cls(FinishKind.STOP, matched=matched)

    @classmethod
    def at_length(cls, length: int) -> FinishReason:
        """Ended by a length limit after `length` tokens."""
        return cls(FinishKind.LENGTH, length=length)

    @classmethod
    def abort(cls, message: str) -> FinishReason:
        """Ended early: by the client, a bad grammar, or a request that can never fit."""
        return cls(FinishKind.ABORT, message=message)

    @property
    def is_abort(self) -> bool:
        """Whether the request was aborted."""
        return self.kind is FinishKind.ABORT

    def to_dict(self) -> dict[str, Any]:
        """SGLang's JSON shape: `{"type": "stop", "matched": ...}` and the like."""
        if self.kind is FinishKind.STOP:
            return {"type": "stop", "matched": self.matched}
        if self.kind is FinishKind.LENGTH:
            return {"type": "length", "length": self.length}
        return {"type": "abort", "message": self.message}
