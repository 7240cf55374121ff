"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from radixlm.core.messages import LogprobEntry
from radixlm.engine.client import RequestGroup
from radixlm.engine.frontend import GenerateInput, RequestState
from radixlm.grammar import GrammarKind, GrammarSpec
from radixlm.server.args import ServerArgs
from radixlm.server.auth import salted
from radixlm.server.chat_output import ChatOutput, ChatParsing
from radixlm.server.errors import ApiError, RequestFailed
from radixlm.server.http import (
    DONE,
    EventStream,
    json_response,
    sse,
    sse_error,
    submit,
    wait_finished,
)
from radixlm.server.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    parse_body,
)
from radixlm.server.openapi import error_responses, event_stream, json_body
from radixlm.server.reasoning import REASONING_FORMATS
from radixlm.server.reasoning_grammar import answer_grammar
from radixlm.server.tokenizer_manager import TokenizerManager
from radixlm.server.tool_grammar import Function, tool_grammar
from radixlm.server.tool_parser import FORMATS, ToolCallFormat, detect_format
from radixlm.tokenizer import Tokenizer

# SamplingParams names the SGLang keys; an OpenAI client sent these instead.
_OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
    "input_ids": "prompt",
}


def openai_names(message: str) -> str:
    """An engine validation message, with SGLang's parameter names turned into OpenAI's."""
    for sglang, openai in _OPENAI_NAMES.items():
        message = message.replace(sglang, openai)
    return message


# ---- requests -> GenerateInput ---------------------------------------------------------------


def completion_input(req: CompletionRequest) -> GenerateInput:
    """The engine input of a completion request (one entry per prompt; n fans out later)."""
    prompt = req.prompt
    if not prompt and not isinstance(prompt, str):
        raise ApiError(400, "prompt must not be empty", "prompt")
    text: str | list[str] | None = None
    ids: list[int] | list[list[int]] | None = None
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        text = prompt  # type: ignore[assignment]
    else:
        ids = prompt  # type: ignore[assignment]
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return GenerateInput(
        text=text,
        input_ids=ids,
        sampling_params=req.sampling_params(max_tokens),
        return_logprob=req.logprobs is not None,
        # echo with logprobs scores the prompt too
        logprob_start_len=0 if req.echo and req.logprobs is not None else -1,
        top_logprobs_num=req.logprobs or 0,
        stream=req.stream,
        cache_salt=req.cache_salt,
    )


def echo_texts(req: CompletionRequest, tokenizer: Tokenizer) -> list[str]:
    """Each prompt as text, for echo."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if isinstance(p[0], str):
        return list(p)  # type: ignore[arg-type]
    if isinstance(p[0], int):
        return [tokenizer.decode(p)]  # type: ignore[arg-type]
    return [tokenizer.decode(ids) for ids in p]  # type: ignore[union-attr]


def chat_prompt(
    req: ChatCompletionRequest, tokenizer: Tokenizer, image_token: str | None = None
) -> tuple[str, list[int]]:
    """Render the conversation (and the tools) with the model's chat template; the text and
    its token ids. Image parts become `image_token`, the model's (None: it takes no images)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tokenizer.apply_chat_template(
            req.conversation(image_token),
            add_generation_prompt=True,
            tools=tools,
            **(req.chat_template_kwargs or {}),
        )
    except ApiError:
        raise
    except Exception as e:  # a template's raise_exception, a missing template, bad kwargs
        raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None
    # The rendered prompt carries its own BOS where the template wants one.
    return text, tokenizer.encode(text, add_special_tokens=False)


def chat_parsing(
    req: ChatCompletionRequest, tokenizer: Tokenizer, args: ServerArgs, prompt: str
) -> ChatParsing:
    """What a chat request's output is parsed for (tool calls, reasoning: only in reasoning
    mode)."""
    tools = None
    if req.calls_tools:
        parser = args.tool_call_parser
        tools = FORMATS[parser] if parser else detect_format(tokenizer.chat_template)
    reasoning = REASONING_FORMATS[args.reasoning_parser] if args.reasoning_parser else None
    if reasoning is not None and not reasoning.thinks(prompt, req.chat_template_kwargs or {}):
        reasoning = None  # the output is all answer, as without a parser
    in_reasoning = reasoning is not None and reasoning.opened_by(prompt)
    return ChatParsing(tools, reasoning, in_reasoning)


def _special_trigger(fmt: ToolCallFormat, tokenizer: Tokenizer) -> int | None:
    """The id of a format's trigger when it is one special token (Mistral's [TOOL_CALLS])."""
    ids = tokenizer.encode(fmt.trigger, add_special_tokens=False) if fmt.trigger else []
    return ids[0] if len(ids) == 1 and tokenizer.is_special(ids[0]) else None


_GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("regex", "json_schema", "ebnf")


def _answer_spec(params: dict[str, Any]) -> GrammarSpec | None:
    """The structured output of a chat request's sampling params; None without one, or with
    more than one or a value of the wrong type (SamplingParams answers those with a 400)."""
    given = [(k, params[k]) for k in _GRAMMAR_KINDS if params.get(k) is not None]
    if len(given) != 1:
        return None
    kind, value = given[0]
    if kind == "json_schema" and isinstance(value, dict):
        value = json.dumps(value)
    return GrammarSpec(kind, value) if isinstance(value, str) else None


def chat_input(
    req: ChatCompletionRequest,
    ids: list[int],
    context_len: int,
    parsing: ChatParsing,
    tokenizer: Tokenizer,
) -> GenerateInput:
    """The engine input of a chat request; no max_tokens means up to the context length. A
    request that may call tools is constrained by the grammar of its calls; in reasoning mode,
    tool calls and structured output apply after the reasoning."""
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    if max_tokens is None:
        max_tokens = max(context_len - len(ids), 0)
    params = req.sampling_params(max_tokens)
    if parsing.tools is not None:
        functions = [
            Function(t.function.name, t.function.parameters or {"type": "object"})
            for t in req.callable_tools()
        ]
        trigger = _special_trigger(parsing.tools, tokenizer)
        params["ebnf"] = tool_grammar(
            parsing.tools,
            functions,
            required=req.tools_required,
            parallel=req.parallel_tool_calls,
            trigger_token=trigger,
            reasoning=parsing.reasoning,
            in_reasoning=parsing.in_reasoning,
        )
        if trigger is not None:
            params["skip_special_tokens"] = False  # the parser must see the trigger
    elif parsing.reasoning is not None and (spec := _answer_spec(params)) is not None:
        try:
            grammar = answer_grammar(parsing.reasoning, parsing.in_reasoning, spec)
        except ValueError as e:
            raise ApiError(400, str(e), spec.kind) from None
        for kind in _GRAMMAR_KINDS:
            params.pop(kind, None)
        params["ebnf"] = grammar
    return GenerateInput(
        input_ids=ids,
        sampling_params=params,
        return_logprob=req.logprobs,
        top_logprobs_num=req.top_logprobs or 0,
        stream=req.stream,
        cache_salt=req.cache_salt,
    )


# ---- GenerateInput results -> OpenAI shapes ------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    """What every chunk and answer of one call repeats."""

    id: str
    created: int
    model: str
    tokenizer: Tokenizer
    n: int

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def finish_fields(state: RequestState) -> dict[str, Any]:
    """finish_reason ("stop", "length" or "abort") and SGLang's matched_stop."""
    fr = state.finish_reason
    if fr is None:
        return {"finish_reason": None}
    return {"finish_reason": fr.kind.value, "matched_stop": fr.matched}


def abort_message(states: list[RequestState]) -> str | None:
    """The message of the first aborted request, if one was."""
    for s in states:
        if s.finish_reason is not None and s.finish_reason.is_abort:
            return f"the request was aborted: {s.finish_reason.message}"
    return None


def usage(states: list[RequestState], n: int) -> dict[str, Any]:
    """Token counts; a prompt sampled n times counts once."""
    firsts = states[::n]
    prompt = sum(len(s.req.input_ids) for s in firsts)
    completion = sum(len(s.output_ids) for s in states)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)},
    }


def legacy_logprobs(
    tok: Tokenizer, entries: list[LogprobEntry], tops: list[list[LogprobEntry]] | None, offset: int
) -> dict[str, Any]:
    """/v1/completions logprobs: tokens, token_logprobs, top_logprobs and text_offset."""
    tokens = [tok.token_text(i) for _, i in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in entries],
        "top_logprobs": None
        if tops is None
        else [{tok.token_text(i): lp for lp, i in t} or None for t in tops],
        "text_offset": offsets,
    }


def chat_logprobs(
    tok: Tokenizer, entries: list[LogprobEntry], tops: list[list[LogprobEntry]]
) -> list[dict[str, Any]]:
    """/v1/chat/completions logprobs.content entries."""

    def item(lp: float | None, i: int) -> dict[str, Any]:
        text = tok.token_text(i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return [
        {**item(lp, i), "top_logprobs": [item(tlp, ti) for tlp, ti in (tops[j] if tops else [])]}
        for j, (lp, i) in enumerate(entries)
    ]


class _Progress:
    """How much of one choice a stream has sent."""

    __slots__ = ("text", "input_lp", "output_lp", "offset", "started")

    def __init__(self) -> None:
        self.text = self.input_lp = self.output_lp = self.offset = 0
        self.started = False

    def delta(self, state: RequestState) -> str:
        text = state.text
        new = text[self.text :]
        self.text = max(self.text, len(text))
        return new


def _completion_choice(
    reply: _Reply, req: CompletionRequest, k: int, s: RequestState, prompts: list[str]
) -> dict[str, Any]:
    prefix = prompts[k // reply.n] if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        entries = (s.input_logprobs if req.echo else []) + s.output_logprobs
        tops = None
        if req.logprobs:
            tops = (s.input_top_logprobs if req.echo else []) + s.output_top_logprobs
        logprobs = legacy_logprobs(reply.tokenizer, entries, tops, 0)
    return {"index": k, "text": prefix + s.text, "logprobs": logprobs, **finish_fields(s)}


async def _stream_events(
    reply: _Reply,
    group: RequestGroup,
    obj: str,
    include_usage: bool,
    choice: Callable[[int, RequestState, _Progress], dict[str, Any] | None],
) -> AsyncGenerator[bytes, None]:
    """The SSE stream shared by completions and chat: `choice` renders what is new for one
    request (None: nothing to send); errors end the stream with an error event."""
    progress = [_Progress() for _ in group.states]
    try:
        while not group.finished:
            for k in await group.updates():
                s = group.states[k]
                if (message := abort_message([s])) is not None:
                    yield sse_error(400, message)
                    yield DONE
                    return
                c = choice(k, s, progress[k])
                progress[k].started = True
                if c is not None:
                    yield sse(reply.envelope(obj, [c]))
    except RequestFailed as e:
        yield sse_error(e.status, str(e))
        yield DONE
        return
    if include_usage:
        yield sse({**reply.envelope(obj, []), "usage": usage(group.states, reply.n)})
    yield DONE


def _completion_events(
    reply: _Reply, req: CompletionRequest, group: RequestGroup, prompts: list[str]
) -> AsyncGenerator[bytes, None]:
    def choice(k: int, s: RequestState, p: _Progress) -> dict[str, Any] | None:
        text = p.delta(s)
        if not p.started and req.echo:
            text = prompts[k // reply.n] + text
        logprobs = None
        if req.logprobs is not None:
            entries = s.output_logprobs[p.output_lp :]
            tops = s.output_top_logprobs[p.output_lp :] if req.logprobs else None
            if req.echo:
                entries = s.input_logprobs[p.input_lp :] + entries
                if tops is not None:
                    tops = s.input_top_logprobs[p.input_lp :] + tops
            p.input_lp, p.output_lp = len(s.input_logprobs), len(s.output_logprobs)
            logprobs = legacy_logprobs(reply.tokenizer, entries, tops, p.offset)
            p.offset += sum(map(len, logprobs["tokens"]))
        if text or s.finished or (logprobs and logprobs["tokens"]):
            return {"index": k, "text": text, "logprobs": logprobs, **finish_fields(s)}
        return None

    return _stream_events(reply, group, "text_completion", req.include_usage, choice)


def _chat_finish(s: RequestState, called: bool) -> dict[str, Any]:
    """finish_fields, where a stop after tool calls is OpenAI's "tool_calls"."""
    fields = finish_fields(s)
    if called and fields["finish_reason"] == "stop":
        fields["finish_reason"] = "tool_calls"
    return fields


def _chat_choice(
    reply: _Reply, req: ChatCompletionRequest, k: int, s: RequestState, parsing: ChatParsing
) -> dict[str, Any]:
    logprobs = None
    if req.logprobs:
        logprobs = {
            "content": chat_logprobs(reply.tokenizer, s.output_logprobs, s.output_top_logprobs)
        }
    message: dict[str, Any] = {"role": "assistant", "content": s.text}
    if parsing.active:
        message.update(ChatOutput(parsing).message(s.text))
    return {
        "index": k,
        "message": message,
        "logprobs": logprobs,
        **_chat_finish(s, "tool_calls" in message),
    }


def _chat_events(
    reply: _Reply, req: ChatCompletionRequest, group: RequestGroup, parsing: ChatParsing
) -> AsyncGenerator[bytes, None]:
    outputs = [ChatOutput(parsing) for _ in group.states]

    def choice(k: int, s: RequestState, p: _Progress) -> dict[str, Any] | None:
        delta: dict[str, Any] = {"role": "assistant"} if not p.started else {}
        if parsing.active:
            delta.update(outputs[k].delta(s.text, s.finished))
            if not p.started:
                delta.setdefault("content", "")
        else:
            text = p.delta(s)
            if text or not p.started:
                delta["content"] = text
        logprobs = None
        if req.logprobs:
            content = chat_logprobs(
                reply.tokenizer,
                s.output_logprobs[p.output_lp :],
                s.output_top_logprobs[p.output_lp :],
            )
            p.output_lp = len(s.output_logprobs)
            logprobs = {"content": content}
        if delta or s.finished or (logprobs and logprobs["content"]):
            called = s.finished and outputs[k].called
            return {"index": k, "delta": delta, "logprobs": logprobs, **_chat_finish(s, called)}
        return None

    return _stream_events(reply, group, "chat.completion.chunk", req.include_usage, choice)


# ---- routes ---------------------------------------------------------------------------------


def openai_router(manager: TokenizerManager) -> APIRouter:
    """The /v1 routes over one tokenizer manager."""
    router = APIRouter(tags=["openai"])
    created = int(time.time())

    def ready_tokenizer() -> Tokenizer:
        manager.check_ready()
        assert manager.tokenizer is not None
        return manager.tokenizer

    def check_model(name: str | None) -> None:
        if name is not None and name not in (manager.served_model_name, manager.model_path):
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {manager.served_model_name!r}",
                "model",
            )

    def reply_for(kind: str, tokenizer: Tokenizer, n: int) -> _Reply:
        return _Reply(
            f"{kind}-{uuid.uuid4().hex}", int(time.time()), manager.served_model_name, tokenizer, n
        )

    def on_close(group: RequestGroup) -> Callable[[], None]:
        return lambda: manager.abort_unfinished(group)

    @router.get("/v1/models", response_model=ModelList, responses=error_responses(503))
    async def models() -> Response:
        """The served model (benchmarks wait on this route and take the name from it)."""
        ready_tokenizer()
        assert manager.info is not None  # set with the tokenizer
        card = {
            "id": manager.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "radixlm",
            "root": manager.model_path,
            "max_model_len": manager.info.context_len,
        }
        return json_response({"object": "list", "data": [card]})

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=error_responses(400, 404, 503),
        openapi_extra={**json_body(CompletionRequest), **event_stream(CompletionChunk)},
    )
    async def completions(request: Request) -> Response:
        """OpenAI's text completions, with SGLang's extra sampling fields."""
        req = parse_body(CompletionRequest, await request.body())
        check_model(req.model)
        req.check_supported()
        tokenizer = ready_tokenizer()
        group = await submit(manager, salted(request, completion_input(req)), openai_names)
        reply = reply_for("cmpl", tokenizer, req.n)
        prompts = echo_texts(req, tokenizer) if req.echo else []
        if req.stream:
            return EventStream(_completion_events(reply, req, group, prompts), on_close(group))
        await wait_finished(request, manager, group)
        if (message := abort_message(group.states)) is not None:
            raise ApiError(400, message)
        choices = [
            _completion_choice(reply, req, k, s, prompts) for k, s in enumerate(group.states)
        ]
        return json_response(
            {**reply.envelope("text_completion", choices), "usage": usage(group.states, req.n)}
        )

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=error_responses(400, 404, 503),
        openapi_extra={**json_body(ChatCompletionRequest), **event_stream(ChatCompletionChunk)},
    )
    async def chat_completions(request: Request) -> Response:
        """OpenAI's chat completions, the prompt rendered with the model's chat template."""
        req = parse_body(ChatCompletionRequest, await request.body())
        check_model(req.model)
        req.check_supported()
        tokenizer = ready_tokenizer()
        size = sum(len(m.content) if isinstance(m.content, str) else 0 for m in req.messages)
        assert manager.info is not None  # set with the tokenizer
        image = manager.info.image
        image_token = image.token_text if image is not None else None
        prompt, ids = await manager.offload(size, chat_prompt, req, tokenizer, image_token)
        parsing = chat_parsing(req, tokenizer, manager.server_args, prompt)
        inp = chat_input(req, ids, manager.info.context_len, parsing, tokenizer)
        if images := req.image_urls():
            inp = dataclasses.replace(inp, image_data=images)
        group = await submit(manager, salted(request, inp), openai_names)
        reply = reply_for("chatcmpl", tokenizer, req.n)
        if req.stream:
            return EventStream(_chat_events(reply, req, group, parsing), on_close(group))
        await wait_finished(request, manager, group)
        if (message := abort_message(group.states)) is not None:
            raise ApiError(400, message)
        choices = [_chat_choice(reply, req, k, s, parsing) for k, s in enumerate(group.states)]
        return json_response(
            {**reply.envelope("chat.completion", choices), "usage": usage(group.states, req.n)}
        )

    return router
