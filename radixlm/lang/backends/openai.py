"""Programs on any OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.chat import ChatTemplate
from radixlm.lang.choices import ChoiceDecision, ChoiceScores, ChoicesMethod
from radixlm.lang.ir import GenParams

# OpenAI's models that only have the completion interface.
INSTRUCT_MODEL_NAMES = frozenset({"gpt-3.5-turbo-instruct", "babbage-002", "davinci-002"})


@dataclass
class TokenUsage:
    """Tokens the API billed, summed over calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def reset(self) -> None:
        """Start counting from zero."""
        self.prompt_tokens = self.completion_tokens = self.calls = 0


class OpenAI(Backend):
    """An OpenAI-compatible API. Chat models get the messages (gens must fill whole assistant
    turns, or use @function(num_api_spec_tokens=K)); completion models get the text."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        is_chat_model: bool | None = None,
        chat_template: ChatTemplate | None = None,
        **client_kwargs: Any,
    ) -> None:
        import openai

        super().__init__(chat_template)
        # Local servers need no key, but the client insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if base_url else None)
        self.client = openai.OpenAI(base_url=base_url, api_key=key, **client_kwargs)
        self.model_name = model_name
        self.is_chat_model = (
            model_name not in INSTRUCT_MODEL_NAMES if is_chat_model is None else is_chat_model
        )
        self.token_usage = TokenUsage()
        self._lock = threading.Lock()

    def generate(
        self, prompt: Prompt, params: GenParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        """One (chat) completion call."""
        kwargs = _openai_kwargs(params)
        if self.is_chat_model:
            ret: Any = self.client.chat.completions.create(
                model=self.model_name, messages=_messages(prompt), **kwargs
            )
            texts = [c.message.content or "" for c in ret.choices]
        else:
            ret = self.client.completions.create(
                model=self.model_name, prompt=prompt.text, **kwargs
            )
            texts = [c.text for c in ret.choices]
        self._count(ret.usage)
        metas = [
            {
                "id": ret.id,
                "finish_reason": c.finish_reason,
                "prompt_tokens": getattr(ret.usage, "prompt_tokens", None),
                "completion_tokens": getattr(ret.usage, "completion_tokens", None),
            }
            for c in ret.choices
        ]
        if (params.n or 1) > 1:
            return texts, metas
        return texts[0], metas[0]

    def generate_stream(
        self, prompt: Prompt, params: GenParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """A streamed (chat) completion call."""
        kwargs = _openai_kwargs(params)
        if self.is_chat_model:
            chunks: Any = self.client.chat.completions.create(
                model=self.model_name, messages=_messages(prompt), stream=True, **kwargs
            )
        else:
            chunks = self.client.completions.create(
                model=self.model_name, prompt=prompt.text, stream=True, **kwargs
            )
        for chunk in chunks:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            piece = (choice.delta.content if self.is_chat_model else choice.text) or ""
            yield piece, {"id": chunk.id, "finish_reason": choice.finish_reason}

    def select(self, prompt: Prompt, choices: list[str], method: ChoicesMethod) -> ChoiceDecision:
        """Score choices by the prompt logprobs of a completion call with echo=True."""
        if self.is_chat_model:
            raise NotImplementedError(
                "select needs prompt logprobs, which chat completion APIs do not return; "
                "use a completion model (is_chat_model=False) or a native backend"
            )
        if method.requires_unconditional_logprobs:
            raise NotImplementedError(
                f"{type(method).__name__} needs token ids; use a native backend"
            )
        texts = [prompt.text + c for c in choices]
        ret: Any = self.client.completions.create(
            model=self.model_name, prompt=texts, max_tokens=1, temperature=0, echo=True, logprobs=0
        )
        self._count(ret.usage)
        scored: list[list[list[Any]]] = [[] for _ in choices]
        for choice in ret.choices:
            lp = choice.logprobs
            if lp is None or lp.text_offset is None or lp.token_logprobs is None:
                raise NotImplementedError("this server does not return prompt logprobs (echo=True)")
            end_of_choice = len(texts[choice.index])
            for tok, logprob, start in zip(
                lp.tokens, lp.token_logprobs, lp.text_offset, strict=True
            ):
                # A token belongs to the choice if it covers one of its characters.
                if (
                    start < end_of_choice
                    and start + len(tok) > len(prompt.text)
                    and logprob is not None
                ):
                    scored[choice.index].append([logprob, None, tok])
        return method(ChoiceScores(choices, scored))

    def _count(self, usage: Any) -> None:
        if usage is None:
            return
        with self._lock:
            self.token_usage.prompt_tokens += usage.prompt_tokens or 0
            self.token_usage.completion_tokens += usage.completion_tokens or 0
            self.token_usage.calls += 1


def _messages(prompt: Prompt) -> Any:
    # Typed Any: the client's TypedDict message types add nothing to {"role", "content"} dicts.
    return prompt.messages


def _openai_kwargs(p: GenParams) -> dict[str, Any]:
    """OpenAI's parameters, plus SGLang's extra body fields where the gen uses them."""
    kwargs: dict[str, Any] = {}
    for ours, theirs in (
        ("max_new_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
    ):
        if (value := getattr(p, ours)) is not None:
            kwargs[theirs] = value
    if p.stop:
        kwargs["stop"] = list(p.stop)
    if p.n is not None and p.n > 1:
        kwargs["n"] = p.n
    if p.json_schema is not None:
        schema = {"name": "schema", "schema": json.loads(p.json_schema)}
        kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
    # Fields OpenAI itself rejects are sent only when a gen needs them.
    extra: dict[str, Any] = {}
    if p.top_k is not None and p.top_k > 0:
        extra["top_k"] = p.top_k
    if p.min_p:
        extra["min_p"] = p.min_p
    if p.min_new_tokens:
        extra["min_tokens"] = p.min_new_tokens
    if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
        extra["repetition_penalty"] = p.repetition_penalty
    if p.stop_token_ids:
        extra["stop_token_ids"] = list(p.stop_token_ids)
    if p.ignore_eos:
        extra["ignore_eos"] = True
    if p.regex is not None:
        extra["regex"] = p.regex
    if extra:
        kwargs["extra_body"] = extra
    return kwargs
