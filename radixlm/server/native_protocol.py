"""SGLang's native wire shapes: the /generate body and its parser, and the native answers.

`parse_generate` checks a /generate body's fields and types by hand (values are checked when
tokenizing, by `tokenize_input`); the models below only describe the bodies and answers for the
OpenAPI document (radixlm.server.openapi) and are never run on a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import NotRequired, TypedDict

from radixlm.engine.frontend import GenerateInput
from radixlm.server.errors import ApiError
from radixlm.server.openapi import closed
from radixlm.tenancy import MAX_PIN_TTL_S, MAX_SALT_CHARS

T = TypeVar("T")

_GENERATE_FIELDS = frozenset(f.name for f in fields(GenerateInput))
# SGLang request fields its clients may send with an "off" value (bench_serving always sends
# lora_path: null); any other value is a feature radixlm does not have.
INERT_FIELDS = frozenset({"lora_path", "return_hidden_states", "custom_logit_processor"})


def parse_generate(data: Mapping[str, Any]) -> GenerateInput:
    """Check a /generate body's fields and types (values are checked when tokenizing)."""
    for key, value in data.items():
        if key in INERT_FIELDS:
            if value:
                raise ApiError(400, f"{key} is not supported", key)
        elif key not in _GENERATE_FIELDS:
            raise ApiError(400, f"unknown field {key!r}", key)
    for key in ("stream", "return_text_in_logprobs"):
        if not isinstance(data.get(key, False), bool):
            raise ApiError(400, f"{key} must be true or false", key)
    _check_type(data, "text", str)
    if not isinstance(data.get("input_ids"), (list, type(None))):
        raise ApiError(
            400, "input_ids must be a list of token ids or a list of such lists", "input_ids"
        )
    _check_type(data, "return_logprob", bool)
    _check_type(data, "logprob_start_len", int)
    _check_type(data, "top_logprobs_num", int)
    _check_type(data, "rid", str)
    _check_type(data, "cache_salt", str)
    params = data.get("sampling_params")
    for p in params if isinstance(params, list) else [params]:
        if (p is not None or params is not None) and not isinstance(p, dict):
            raise ApiError(
                400, "sampling_params must be an object or a list of objects", "sampling_params"
            )
    return GenerateInput(**{k: v for k, v in data.items() if k in _GENERATE_FIELDS})


def _check_type(data: Mapping[str, Any], key: str, kind: type) -> None:
    value = data.get(key)
    items = value if isinstance(value, list) else [value]
    for v in items:
        if v is None and value is not None:  # a list's items are never null
            raise ApiError(400, f"{key} must be a {kind.__name__} or a list of them, got null", key)
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise ApiError(
                400, f"{key} must be a {kind.__name__} or a list of them, got {v!r}", key
            )


# ---- the /generate body ----------------------------------------------------------------------

TokenId = Annotated[int, Field(ge=0)]
Batch = Annotated[list[T], Field(min_length=1)]  # an empty batch or prompt is an error
Count = Annotated[int, Field(ge=0)]
StartLen = Annotated[int, Field(ge=-1)]
ImageData = Annotated[str, Field(min_length=1)]
Stop = Annotated[str, Field(min_length=1)]
Salt = Annotated[str, Field(min_length=1, max_length=MAX_SALT_CHARS)]
# What Python takes for false, spelled in JSON: the only values an inert field accepts.
Off = Annotated[
    Any,
    Field(
        description="Accepted only when off (null, false, 0 or empty): radixlm has no such feature",
        json_schema_extra={"enum": [None, False, 0, "", [], {}]},
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParamsInput(_Body):
    """`sampling_params`, with SGLang's keys and defaults (radixlm.core.params.SamplingParams)."""

    max_new_tokens: int = Field(
        128, ge=0, description="0 runs the prefill only (caches the prompt)"
    )
    min_new_tokens: int = Field(0, ge=0, description="at most max_new_tokens")
    temperature: float = Field(1.0, ge=0, description="below 1e-6: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off")
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    stop: Stop | list[Stop] | None = None
    stop_token_ids: TokenId | list[TokenId] | None = None
    stop_regex: Stop | list[Stop] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, description="samples per prompt (the answer is then a list)")
    sampling_seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = Field(None, description="at most one of regex, json_schema and ebnf")
    json_schema: str | dict[str, Any] | None = Field(None, description="a JSON schema")
    ebnf: str | None = None
    close_on_length: bool = Field(
        True,
        description="with json_schema: a document the budget would cut ends with its shortest "
        "completion instead, so it always parses (finish reason still length)",
    )


def _given(key: str) -> dict[str, Any]:
    return {"required": [key], "properties": {key: {"not": {"type": "null"}}}}


class GenerateReqInput(_Body):
    """The body of /generate: exactly one of `text` and `input_ids`; a list is a batch, and each
    per-request field may then be a list of the same length."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [_given("text"), _given("input_ids")]})

    text: str | Batch[str] | None = None
    input_ids: Batch[TokenId] | Batch[Batch[TokenId]] | None = None
    sampling_params: SamplingParamsInput | Batch[SamplingParamsInput] | None = None
    return_logprob: bool | Batch[bool] | None = False
    logprob_start_len: StartLen | Batch[StartLen] | None = Field(
        None, description="-1 (the default): output tokens only; 0: the whole prompt"
    )
    top_logprobs_num: Count | Batch[Count] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = Field(False, description="answer with server-sent events (text/event-stream)")
    rid: str | Batch[str] | None = None
    cache_salt: Salt | None = Field(
        None,
        description="requests with different salts share no cached K/V (a user key's tenant is "
        "always part of its salt); public prefixes stay shared",
    )
    lora_path: Off = None
    image_data: ImageData | list[ImageData | list[ImageData] | None] | None = Field(
        None,
        description="images for a LLaVA-style model, each where the prompt has an image token: "
        "one or a list per prompt, a list per prompt for a batch; a data URL or base64 (a "
        "local path under --image-dir, an http(s) URL with --allow-image-urls)",
    )
    return_hidden_states: Off = None
    custom_logit_processor: Off = None


class AbortReqInput(_Body):
    """The body of /abort_request: a request id, or `abort_all`."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["rid"], "properties": {"rid": {"type": "string"}}},
                {"required": ["abort_all"], "properties": {"abort_all": {"const": True}}},
            ]
        }
    )

    rid: str | None = None
    abort_all: bool = False


# ---- answers ---------------------------------------------------------------------------------


@closed
class FinishStop(TypedDict):
    """Ended by a stop token id, stop string or stop regex; null for a complete grammar."""

    type: Literal["stop"]
    matched: int | str | None


@closed
class FinishLength(TypedDict):
    """Ended at max_new_tokens or the context length, after `length` tokens."""

    type: Literal["length"]
    length: int


@closed
class FinishAbort(TypedDict):
    """Ended early: by the client, a bad grammar, a timeout, or a request that can never fit."""

    type: Literal["abort"]
    message: str


FinishReasonJson = Annotated[FinishStop | FinishLength | FinishAbort, Field(discriminator="type")]
# [logprob, token id, token text]: the text with return_text_in_logprobs, else null; the first
# prompt position, and -inf, have logprob null.
LogprobTriple = tuple[float | None, int, str | None]


@closed
class MetaInfo(TypedDict):
    """What SGLang's clients read besides the text; logprobs only with return_logprob."""

    id: str
    finish_reason: FinishReasonJson | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float
    input_token_logprobs: NotRequired[list[LogprobTriple]]
    output_token_logprobs: NotRequired[list[LogprobTriple]]
    input_top_logprobs: NotRequired[list[list[LogprobTriple]]]
    output_top_logprobs: NotRequired[list[list[LogprobTriple]]]


@closed
class GenerateOutput(TypedDict):
    """One request's answer (a list of them for a batch or n > 1)."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo


@closed
class GenerateChunk(GenerateOutput):
    """One streamed event: text and output_ids are cumulative; `index` tags a batch's events."""

    index: NotRequired[int]


@closed
class ModelInfo(TypedDict):
    """/model_info: SGLang's frontend picks its chat template from model_path."""

    model_path: str
    tokenizer_path: str
    is_generation: bool
    served_model_name: str
    chat_template: str | None  # the --chat-template file replacing the model's, if any
    image_token: str | None  # where a prompt puts an image; None for a text-only model


@closed
class SpecCountersState(TypedDict):
    """Speculative decoding's totals for one draft source (radixlm.core.messages.SpecCounters)."""

    drafted: int  # draft tokens fed
    accepted: int  # draft tokens the model wrote too
    verified: int  # drafts verified


@closed
class InternalState(TypedDict, total=False):
    """The engine's live counters (radixlm.core.messages.CoreStats), once it has started."""

    num_running_reqs: int
    num_queue_reqs: int
    num_used_tokens: int
    token_usage: float
    max_total_num_tokens: int
    cached_tree_tokens: int
    num_forward_passes: int
    num_retractions: int
    spec: dict[str, SpecCountersState]  # by draft source (ngram, radix); empty when off
    # Tokens per step that verified a draft, all sources; null without speculative decoding
    # (bench_serving reads it)
    avg_spec_accept_length: float | None
    cache_hit_tokens_pool: int
    cache_hit_tokens_disk: int
    disk_cache_tokens: int
    disk_cache_bytes: int


class ServerInfo(TypedDict):
    """/server_info: the resolved server and engine arguments (and, once the engine has
    started, what it chose: context_len, max_total_num_tokens, device, ...), plus these."""

    model_path: str
    served_model_name: str
    version: str
    internal_states: list[InternalState]
    # Objects the server's process froze once its first engine was up (gc.freeze); the
    # engine process's own count is gc_frozen_objects.
    server_gc_frozen_objects: int
    # The linear layers' GEMM by row count and how it was chosen (measured at start, cached
    # from an earlier start, forced by RADIXLM_GEMM) and the BLAS the kernels call, e.g.
    # "stream (1-16 rows), stream (-64), stream (65+); fixed; sgemm: OpenBLAS 0.3.34
    # (Haswell)"; "F.linear" off the CPU kernels.
    gemm: NotRequired[str]


@closed
class AbortResult(TypedDict):
    """How many requests were aborted."""

    aborted: int


@closed
class InvariantResult(TypedDict):
    """Every KV slot is free, in the radix tree, or owned by one running request."""

    ok: Literal[True]


# ---- the cache routes (radixlm's own: tenants, pins, the tree view) -------------------------


class PinInput(_Body):
    """The body of POST /cache/pin: the prefix as text or token ids (exactly one)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [_given("text"), _given("input_ids")]})

    text: str | None = None
    input_ids: Batch[TokenId] | None = None
    ttl_s: float = Field(300.0, gt=0, le=MAX_PIN_TTL_S, description="seconds until it expires")
    cache_salt: Salt | None = None


@closed
class PinOutput(TypedDict):
    """A pin: eviction skips its prefix until it expires or is deleted."""

    pin_id: str
    tenant: str
    tokens: int
    expires_in_s: float


@closed
class UnpinOutput(TypedDict):
    """The answer of DELETE /cache/pin/{pin_id}."""

    unpinned: str


class PublicPrefixInput(_Body):
    """The body of POST /cache/public_prefix: a prefix every tenant may share (text or ids)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [_given("text"), _given("input_ids")]})

    text: str | None = None
    input_ids: Batch[TokenId] | None = None


@closed
class PublicPrefixOutput(TypedDict):
    """A registered public prefix."""

    input_ids: list[int]
    new: bool


@closed
class CacheNode(TypedDict):
    """One node of GET /cache; `more_*` count descendants left out to bound the answer."""

    id: int
    parent: int  # -1: a child of the root
    tokens: int
    depth: int
    text: str  # the decoded start of the node's tokens
    hits: int
    last_access: int
    lock_ref: int
    pinned: bool
    tier: str
    tenant: str | None
    more_nodes: int
    more_tokens: int


@closed
class CacheStats(TypedDict):
    """The pool's and the cache's counters (admins only)."""

    pool_slots: int
    free_slots: int
    tree_tokens: int
    evicted_tokens: int
    cache_hit_rate: float
    prompt_tokens: int
    cached_tokens: int


@closed
class CacheTreeOutput(TypedDict):
    """GET /cache: the tree as the caller may see it (an admin: all; a user: its own and the
    public nodes), the biggest subtrees first."""

    tenant: str | None  # the caller's tenant; None for an admin
    clock: int  # the tree's latest last_access
    visible_nodes: int
    visible_tokens: int
    nodes: list[CacheNode]
    pins: list[PinOutput]
    public_prefix_tokens: list[int]
    stats: CacheStats | None
