"""A chat choice's output as message fields: reasoning, content and tool calls, whole or as
stream deltas. One parse serves both, so streamed deltas add up to the whole message."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from radixlm.server.reasoning import ReasoningFormat, split_reasoning
from radixlm.server.tool_parser import ToolCall, ToolCallFormat, parse_tool_calls


@dataclass(frozen=True)
class ChatParsing:
    """What a request's output is parsed for: tool calls in `tools`' format (None: not
    parsed), reasoning in `reasoning`'s, `in_reasoning` when the prompt opened it."""

    tools: ToolCallFormat | None = None
    reasoning: ReasoningFormat | None = None
    in_reasoning: bool = False

    @property
    def active(self) -> bool:
        """Whether the output is more than content."""
        return self.tools is not None or self.reasoning is not None


@dataclass(frozen=True, slots=True)
class _Split:
    reasoning: str
    content: str
    calls: list[ToolCall]


class ChatOutput:
    """One choice's output, parsed as it grows; remembers what the stream has sent."""

    def __init__(self, parsing: ChatParsing) -> None:
        self.parsing = parsing
        self._reasoning = 0  # characters of each part sent
        self._content = 0
        self._calls: list[tuple[str, int]] = []  # (id, characters of arguments sent)

    def _split(self, text: str, final: bool) -> _Split:
        p = self.parsing
        reasoning = ""
        if p.reasoning is not None:
            reasoning, text = split_reasoning(p.reasoning, text, p.in_reasoning, final)
        if p.tools is None:
            return _Split(reasoning, text, [])
        parsed = parse_tool_calls(p.tools, text, final)
        calls = [c for c in parsed.calls if c.name is not None]
        content = parsed.content
        # Layout before a call is not content; until the end, any whitespace may precede one.
        if calls or not final:
            content = content.rstrip()
        return _Split(reasoning, content, calls)

    def message(self, text: str) -> dict[str, Any]:
        """The message fields of a finished output."""
        s = self._split(text, final=True)
        msg: dict[str, Any] = {"content": s.content if s.content or not s.calls else None}
        if s.calls:
            msg["tool_calls"] = [
                {
                    "id": _call_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in s.calls
            ]
        if self.parsing.reasoning is not None:
            msg["reasoning_content"] = s.reasoning or None
        return msg

    @property
    def called(self) -> bool:
        """Whether the deltas so far included a tool call."""
        return bool(self._calls)

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """What the output adds to the message since the last delta (keys with nothing new
        left out)."""
        s = self._split(text, final)
        delta: dict[str, Any] = {}
        if len(s.reasoning) > self._reasoning:
            delta["reasoning_content"] = s.reasoning[self._reasoning :]
            self._reasoning = len(s.reasoning)
        if len(s.content) > self._content:
            delta["content"] = s.content[self._content :]
            self._content = len(s.content)
        calls = []
        for i, call in enumerate(s.calls):
            if i == len(self._calls):
                self._calls.append((_call_id(), 0))
                calls.append(
                    {
                        "index": i,
                        "id": self._calls[i][0],
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
            elif len(call.arguments) > self._calls[i][1]:
                new = call.arguments[self._calls[i][1] :]
                calls.append({"index": i, "function": {"arguments": new}})
            self._calls[i] = (self._calls[i][0], len(call.arguments))
        if calls:
            delta["tool_calls"] = calls
        return delta


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
