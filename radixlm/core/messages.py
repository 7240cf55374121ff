"""Messages between the frontend (tokenizer side) and the engine core (scheduler side)."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixlm.core.finish import FinishReason
from radixlm.core.images import ImageSpan, ImageSpec
from radixlm.core.params import SamplingParams

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
    images: tuple[ImageSpan, ...] = ()  # image positions in input_ids, with their pixels
    # The cache namespace: requests with different salts share no K/V past the public prefix.
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Stop a request now; it finishes with reason abort."""

    rid: str
    message: str = "aborted by the client"


@dataclass(frozen=True, slots=True)
class FlushCache:
    """Empty the radix cache (what the disk tier holds stays); answered with False (nothing
    changed) while requests run."""


@dataclass(frozen=True, slots=True)
class ClearDiskCache:
    """Delete every block of the disk KV tier (a flush keeps them); answered with the tokens
    they held, or None without a tier."""


@dataclass(frozen=True, slots=True)
class GetStats:
    """Read the core's counters; answered with a CoreStats."""


@dataclass(frozen=True, slots=True)
class CheckInvariant:
    """Assert that every KV slot has one owner; answered with True or the AssertionError."""


@dataclass(frozen=True, slots=True)
class DrainCacheEvents:
    """Take the radix tree's changes since the last drain; answered with a CacheEventBatch. The
    first drain starts recording and answers with a snapshot, as does `snapshot=True` and any
    drain after the bounded record overflowed."""

    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class AddPublicPrefix:
    """Register token ids that every salt shares (a public prefix); answered with True if new."""

    input_ids: list[int]


@dataclass(frozen=True, slots=True)
class PinPrefix:
    """Pin the cached path of input_ids under cache_salt for ttl_s seconds, within tenant's
    quota; answered with a PinInfo, None if input_ids are not all cached (prefill them first),
    or a PinQuotaExceeded."""

    input_ids: list[int]
    cache_salt: str | None
    tenant: str
    ttl_s: float
    quota_tokens: int


@dataclass(frozen=True, slots=True)
class Unpin:
    """End a pin; tenant None may end anyone's. Answered with False if there is no such pin."""

    pin_id: str
    tenant: str | None


@dataclass(frozen=True, slots=True)
class ReadCacheTree:
    """What tenant (None: an admin, everything) may see of the tree, at most max_nodes nodes;
    answered with a radixlm.tenancy.CacheTree."""

    tenant: str | None
    max_nodes: int


ControlCall = (
    FlushCache
    | ClearDiskCache
    | GetStats
    | CheckInvariant
    | DrainCacheEvents
    | AddPublicPrefix
    | PinPrefix
    | Unpin
    | ReadCacheTree
)

# A change to the set of cached token sequences (see radixlm.cache.radix.ChangeListener):
# ("insert", ids, held) or ("remove", path, keep).
CacheEvent = tuple[str, list[int], int]


@dataclass(frozen=True, slots=True)
class CacheEventBatch:
    """The radix tree's changes, in order: from `snapshot` (the whole tree as (parent index or
    -1, key) in preorder) if set, else from the previous batch."""

    snapshot: list[tuple[int, list[int]]] | None
    events: list[CacheEvent]


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A control call into the core, answered by the ControlReply with the same call_id."""

    call_id: int
    call: ControlCall


@dataclass(frozen=True, slots=True)
class ControlReply:
    """The answer to a ControlRequest: the call's value, or the exception it raised."""

    call_id: int
    value: object


# What the frontend sends the core; None asks the core's loop to stop.
Message = GenerateRequest | AbortRequest | ControlRequest | None


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """What the frontend needs to know about a started core."""

    model_path: str
    context_len: int
    vocab_size: int
    max_total_num_tokens: int  # KV slots in the pool
    chunked_prefill_size: int
    max_running_requests: int
    device: str
    dtype: str
    kernel_backend: str  # the ops the model runs: compiled CPU kernels or plain torch
    load_seconds: float
    image: ImageSpec | None = None  # how the model takes images; None for text-only models
    gemm: str = "F.linear"  # the linear layers' GEMM by row count, and how it was chosen
    # Objects the engine's process froze after start (gc.freeze: no collection walks them)
    gc_frozen_objects: int = 0


@dataclass(slots=True)
class SpecCounters:
    """Speculative decoding's totals for one draft source."""

    drafted: int = 0  # draft tokens fed
    accepted: int = 0  # draft tokens the model wrote too
    verified: int = 0  # drafts verified (steps of a request that fed one)

    @property
    def accept_length(self) -> float:
        """Tokens a step that verified a draft gave on average (its accepted drafts and the
        model's own token); 0.0 before any."""
        return (self.accepted + self.verified) / self.verified if self.verified else 0.0


@dataclass(frozen=True, slots=True)
class CoreStats:
    """The core's live counters, for /metrics, /server_info and tests."""

    num_running_reqs: int
    num_queue_reqs: int
    num_used_tokens: int
    token_usage: float
    max_total_num_tokens: int
    cached_tree_tokens: int
    num_forward_passes: int
    num_retractions: int
    # Speculative decoding by draft source (ngram, radix); empty when it is off.
    spec: dict[str, SpecCounters] = field(default_factory=dict)
    # Prompt tokens admitted from the cache, by the tier they were found in.
    cache_hit_tokens_pool: int = 0
    cache_hit_tokens_disk: int = 0
    disk_cache_tokens: int = 0  # tokens with a copy in the disk tier (0 without one)
    disk_cache_bytes: int = 0


@dataclass(slots=True)
class TokenOutput:
    """What one request produced in one scheduler step: new tokens, and the end if it ended."""

    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    queue_time: float | None = None  # seconds from arrival to first admission; None before
    finish_reason: FinishReason | None = None
    # logprob data produced in this step (lists extend across outputs of the same request)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    input_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True on the request's last output."""
        return self.finish_reason is not None
