"""OpenAI's wire shapes: the request bodies of /v1/completions and /v1/chat/completions (with
SGLang's extras), parsed strictly, and the answers of the /v1 routes, for the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import NotRequired, TypedDict

from radixlm.server.errors import ApiError
from radixlm.server.openapi import closed
from radixlm.tenancy import MAX_SALT_CHARS

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    # Unknown fields are errors (OpenAI rejects them too); "1" is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """`stream_options`: whether the last event carries the usage."""

    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang's extra body fields.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Structured output (checked, and compiled, when the request is tokenized).
    regex: str | None = None
    ebnf: str | None = None
    json_schema: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's: requests with different salts share no cached K/V (a user key adds its tenant).
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)
    # radixlm's: false keeps a JSON output that max_tokens cuts as it was cut (default: closed).
    close_on_length: bool | None = None

    def sampling_params(self, max_new_tokens: int) -> dict[str, Any]:
        """SGLang's sampling_params for these fields (unset ones keep SGLang's defaults)."""
        params = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_tokens,
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "sampling_seed": self.seed,
            "skip_special_tokens": self.skip_special_tokens,
            "close_on_length": self.close_on_length,
            **self._structured_output(),
        }
        return {k: v for k, v in params.items() if v is not None}

    def _structured_output(self) -> dict[str, Any]:
        """regex / ebnf / json_schema from the extra fields and response_format (vetted by
        check_supported); more than one grammar is a 400 from SamplingParams."""
        fmt = self.response_format or {}
        schema = self.json_schema
        if fmt.get("type") in ("json_object", "json_schema"):
            if schema is not None:
                raise ApiError(400, "give json_schema or response_format, not both", "json_schema")
            json_object = fmt["type"] == "json_object"
            schema = {"type": "object"} if json_object else fmt["json_schema"]["schema"]
        return {"regex": self.regex, "ebnf": self.ebnf, "json_schema": schema}

    def check_supported(self) -> None:
        """400 for fields that parse but name a feature radixlm does not have (yet)."""
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ApiError(
                400,
                f"response_format type must be text, json_object or json_schema, got {kind!r}",
                "response_format",
            )
        spec = fmt.get("json_schema")
        if kind == "json_schema" and not (isinstance(spec, dict) and "schema" in spec):
            raise ApiError(
                400,
                "response_format of type json_schema needs json_schema: {name, schema}",
                "response_format",
            )
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "stream_options is only allowed when stream is true", "stream_options"
            )

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """The body of /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None  # bench_serving sends 1; only best_of == n (no ranking) is served

    def check_supported(self) -> None:
        """As for every request, plus best_of, which radixlm serves only as n."""
        super().check_supported()
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of must equal n (candidates are not ranked)", "best_of")


class FunctionCallParam(_Strict):
    """A call an assistant made: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallParam(_Strict):
    """One of an assistant message's tool_calls, as the API returned it."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    """One message of a conversation; extra keys reach the chat template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None  # of a tool message: the call it answers
    reasoning_content: str | None = None


class FunctionDefinition(_Strict):
    """A function the model may call; `parameters` is a JSON schema its arguments match."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always match the schema here


class Tool(_Strict):
    """An entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    """The function a named tool_choice forces."""

    name: str


class NamedToolChoice(_Strict):
    """`tool_choice` naming the function the model must call."""

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    """The body of /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """As for completions, plus tool_choice against tools and a top_logprobs without
        logprobs."""
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ApiError(400, "tools: function names must be unique", "tools")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(
                400, f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice"
            )
        if self.calls_tools and any(
            x is not None for x in (self.regex, self.ebnf, self.json_schema, self.response_format)
        ):
            raise ApiError(
                400,
                "tools cannot be combined with regex, ebnf, json_schema or response_format",
                "tools",
            )

    @property
    def calls_tools(self) -> bool:
        """Whether the model may call tools (then its output is constrained and parsed)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tools_required(self) -> bool:
        """Whether the output must be calls only."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def callable_tools(self) -> list[Tool]:
        """The tools the model may call: all of them, or the one tool_choice names."""
        tools = self.tools or []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in tools if t.function.name == self.tool_choice.function.name]
        return list(tools)

    def conversation(self, image_token: str | None = None) -> list[dict[str, Any]]:
        """The messages as the chat template expects them: parts joined into a string, an
        image part as `image_token` (the model's; None where it takes no images)."""
        out = []
        for i, m in enumerate(self.messages):
            msg = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if _image_url(part, i) is not None:
                        if image_token is None:
                            raise ApiError(
                                400,
                                f"messages[{i}].content: the model takes no images (text only)",
                                f"messages.{i}.content",
                            )
                        texts.append(image_token)
                        continue
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(
                            400,
                            f"messages[{i}].content: only text and image_url parts are supported",
                            f"messages.{i}.content",
                        )
                    texts.append(part["text"])
                msg["content"] = "\n".join(texts)
            elif m.content is None:
                msg["content"] = ""
            for call in msg.get("tool_calls", []):
                # Templates (and Hugging Face's docs) expect the arguments as a mapping.
                call["function"]["arguments"] = _arguments(call["function"]["arguments"])
            out.append(msg)
        return out

    def image_urls(self) -> list[str]:
        """The URLs of the messages' image_url parts, in order."""
        return [
            url
            for i, m in enumerate(self.messages)
            if isinstance(m.content, list)
            for part in m.content
            if (url := _image_url(part, i)) is not None
        ]


def _image_url(part: dict[str, Any], i: int) -> str | None:
    """The URL of an `{"type": "image_url", "image_url": {"url": ...}}` part of message i;
    None for other parts. A malformed image part is a 400."""
    if part.get("type") != "image_url":
        return None
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise ApiError(
            400,
            f"messages[{i}].content: an image_url part needs image_url.url (a data URL)",
            f"messages.{i}.content",
        )
    return url


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Union members appear in pydantic's error locations ("prompt.list[int].0"); readers want fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [
            str(x)
            for x in err["loc"]
            if isinstance(x, int) or (x not in _TYPE_TAGS and "[" not in x and "-" not in x)
        ]
        if not loc:
            if err["type"] == "json_invalid":
                raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
            raise ApiError(400, f"the body must be a JSON object: {err['msg']}") from None
        field = ".".join(loc)
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise ApiError(400, f"{field}: {msg}", field) from None


# ---- answers ---------------------------------------------------------------------------------

FinishReasonName = Literal["stop", "length", "abort", "tool_calls"]


@closed
class PromptTokensDetails(TypedDict):
    """How much of the prompts came from the radix cache."""

    cached_tokens: int


@closed
class Usage(TypedDict):
    """Token counts; a prompt sampled n times counts once."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


@closed
class CompletionLogprobs(TypedDict):
    """/v1/completions logprobs; a logprob of -inf is null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None] | None
    text_offset: list[int]


@closed
class CompletionChoice(TypedDict):
    """One completion (a streamed one carries the new text only); SGLang adds matched_stop."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName | None
    matched_stop: NotRequired[int | str | None]


@closed
class CompletionResponse(TypedDict):
    """The answer of /v1/completions."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


@closed
class CompletionChunk(TypedDict):
    """One streamed event of /v1/completions; the last, with include_usage, has only usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: NotRequired[Usage]


@closed
class TopLogprob(TypedDict):
    """A token, its logprob (null for -inf) and its UTF-8 bytes."""

    token: str
    logprob: float | None
    bytes: list[int]


@closed
class ChatLogprob(TopLogprob):
    """A sampled token and the most likely alternatives at its position."""

    top_logprobs: list[TopLogprob]


@closed
class ChatLogprobs(TypedDict):
    """/v1/chat/completions logprobs."""

    content: list[ChatLogprob]


@closed
class FunctionCall(TypedDict):
    """The function a tool call calls, and its arguments as a JSON string."""

    name: str
    arguments: str


@closed
class ToolCallOut(TypedDict):
    """A tool call the model made."""

    id: str
    type: Literal["function"]
    function: FunctionCall


@closed
class AssistantMessage(TypedDict):
    """The generated message: text (null when the model only called tools), its tool calls,
    and with --reasoning-parser the reasoning before the answer."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: NotRequired[list[ToolCallOut]]
    reasoning_content: NotRequired[str | None]


@closed
class ChatChoice(TypedDict):
    """One chat completion; SGLang adds matched_stop."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None
    matched_stop: NotRequired[int | str | None]


@closed
class ChatCompletionResponse(TypedDict):
    """The answer of /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


@closed
class FunctionCallDelta(TypedDict, total=False):
    """The name (in a call's first delta) and the next piece of its arguments."""

    name: str
    arguments: str


@closed
class ToolCallDelta(TypedDict):
    """What a streamed event adds to the tool call at `index` (id and type come first)."""

    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: FunctionCallDelta


@closed
class ChatDelta(TypedDict, total=False):
    """What a streamed event adds to a message: the role first, then reasoning, content and
    tool calls."""

    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[ToolCallDelta]


@closed
class ChatChunkChoice(TypedDict):
    """One choice's part of a streamed event."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None
    matched_stop: NotRequired[int | str | None]


@closed
class ChatCompletionChunk(TypedDict):
    """One streamed event of /v1/chat/completions; the last, with include_usage, has only usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage]


@closed
class ModelCard(TypedDict):
    """The served model; benchmarks take its id as the model name."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


@closed
class ModelList(TypedDict):
    """The answer of /v1/models: the one served model."""

    object: Literal["list"]
    data: list[ModelCard]
