"""Messages between the frontend (tokenizer side) and the engine core (scheduler side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixlm.sampling import SamplingParams

# A logprob entry: (logprob or None for the first prompt token, token id).
LogprobEntry = tuple[float | None, int]


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A tokenized request, as the scheduler receives it."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only; k: prompt logprobs from token k
    top_logprobs_num: int = 0


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Stop a request now; it finishes with reason abort."""

    rid: str
    message: str = "aborted by the client"


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A call into the engine core answered with a ControlReply (flush_cache, stats, ...)."""

    kind: str
    call_id: int
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ControlReply:
    """The answer to a ControlRequest with the same call_id."""

    call_id: int
    value: Any


@dataclass(slots=True)
class TokenOutput:
    """What one request produced in one scheduler step: new tokens, and the end if it ended."""

    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    queue_time: float | None = None  # seconds from arrival to first admission; None before
    finish_reason: dict[str, Any] | None = None
    # logprob data produced in this step (lists extend across outputs of the same request)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    input_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True on the request's last output."""
        return self.finish_reason is not None
