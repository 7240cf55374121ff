"""A request's prompt as token ids, tokenized as the workers do, for cache-aware routing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from radixlm.router.workers import WorkerPool
from radixlm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Prompts longer than this (in characters) are tokenized on a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 8192
TOKENIZER_RETRY_S = 1.0


class PromptReader:
    """Loads the workers' tokenizer (from --tokenizer-path, else from a worker's /model_info)
    and reads requests' prompts as token ids; until it is loaded, prompts read as no tokens."""

    def __init__(self, client: httpx.AsyncClient, pool: WorkerPool, path: str | None) -> None:
        self.client = client
        self.pool = pool
        self.path = path
        self.tokenizer: Tokenizer | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Load the tokenizer in the background."""
        self._task = asyncio.create_task(self._load())

    async def close(self) -> None:
        """Stop loading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _load(self) -> None:
        while self.tokenizer is None:
            path, template = self.path, None
            if path is None:
                for worker in self.pool.healthy():
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                        info = (await self.client.get(worker.url + "/model_info")).json()
                        path, template = info["tokenizer_path"], info.get("chat_template")
                        break
            if path is not None:
                try:
                    self.tokenizer = await asyncio.to_thread(Tokenizer.load, path, template)
                    logger.info("routing with the tokenizer of %s", path)
                    return
                except Exception as e:
                    logger.warning("cannot load the tokenizer of %s: %s", path, e)
            await asyncio.sleep(TOKENIZER_RETRY_S)

    async def ids(self, kind: str, data: Mapping[str, Any]) -> list[int]:
        """The token ids of a request's (first) prompt: kind is generate, completion or chat.
        Anything unexpected reads as no tokens: the worker answers for a bad request."""
        tok = self.tokenizer
        if tok is None:
            return []
        try:
            if kind == "chat":
                text = _chat_text(tok, data)
                special = False
            else:
                prompt = data.get("text") if kind == "generate" else data.get("prompt")
                if kind == "generate" and prompt is None:
                    prompt = data.get("input_ids")
                if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                    prompt = prompt[0]  # a batch: its first prompt
                if isinstance(prompt, list):
                    return [int(t) for t in prompt]
                if not isinstance(prompt, str):
                    return []
                text, special = prompt, True
            if len(text) > INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(tok.encode, text, special)
            return tok.encode(text, special)
        except Exception:
            return []


def _chat_text(tok: Tokenizer, data: Mapping[str, Any]) -> str:
    """The chat prompt as the worker renders it (text parts of a message joined by lines)."""
    messages = []
    for m in data["messages"]:
        msg = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if isinstance(content, list):
            msg["content"] = "\n".join(p["text"] for p in content if p.get("type") == "text")
        elif content is None:
            msg["content"] = ""
        messages.append(msg)
    kwargs = data.get("chat_template_kwargs") or {}
    return tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
