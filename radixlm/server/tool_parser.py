"""Tool-call formats (Hermes / Qwen, Mistral, Llama 3 JSON): finding the calls in a model's text,
whole or as it streams.

A format is described once (`ToolCallFormat`); the same description drives the parser here and
the grammar that constrains the model (`tool_grammar.py`), so the two cannot disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes tool calls: blocks of JSON objects `{"name": ..., ARGS_KEY: {...}}`.

    A block is `trigger open call (sep call)* close`; with `between` set, blocks may repeat with
    that text between them (one call per block when `sep` is None). An empty trigger means the
    calls, if any, are the whole output, which then starts with `{`.
    """

    name: str
    trigger: str
    open: str
    close: str
    sep: str | None
    between: str | None
    args_key: str


HERMES = ToolCallFormat("hermes", "<tool_call>", "\n", "\n</tool_call>", None, "\n", "arguments")
MISTRAL = ToolCallFormat("mistral", "[TOOL_CALLS]", "[", "]", ", ", None, "arguments")
LLAMA3 = ToolCallFormat("llama3", "", "", "", "; ", None, "parameters")
FORMATS = {"hermes": HERMES, "qwen25": HERMES, "mistral": MISTRAL, "llama3": LLAMA3}
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open its calls with it


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The format a chat template teaches its model; Hermes when it names none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if PYTHON_TAG in template or '"parameters": ' in template:
        return LLAMA3
    return HERMES


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call as parsed: the name (None until the model has written it) and the arguments as
    JSON text, exactly as written (a prefix of them while the call is still open)."""

    name: str | None
    arguments: str
    complete: bool


@dataclass(frozen=True, slots=True)
class Parsed:
    """A text split into what the user reads and the calls the model made."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


# The head of a call with its keys in the grammar's order; the arguments start where it ends.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def parse_tool_calls(fmt: ToolCallFormat, text: str, final: bool = True) -> Parsed:
    """Split `text` into content and calls. With final=False (a stream in progress) content
    stops short of what may still turn into a trigger, and the last call may be open."""
    if not fmt.trigger:
        return _parse_whole(fmt, text, final)
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        at = text.find(fmt.trigger, pos)
        if at < 0:
            tail = text[pos:]
            content.append(tail if final else tail[: len(tail) - partial_suffix(tail, fmt.trigger)])
            break
        content.append(text[pos:at])
        end = _scan_block(fmt, text, at + len(fmt.trigger), calls)
        if end is None:
            break
        pos = end
    return Parsed("".join(content), calls)


def _parse_whole(fmt: ToolCallFormat, text: str, final: bool) -> Parsed:
    start = len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0
    if not text.startswith("{", start):
        if not final and PYTHON_TAG.startswith(text):
            return Parsed("")
        return Parsed(text)
    calls: list[ToolCall] = []
    end = _scan_calls(fmt, text, start, calls)
    return Parsed("" if end is None else text[end:].strip(), calls)


def _scan_block(fmt: ToolCallFormat, text: str, pos: int, calls: list[ToolCall]) -> int | None:
    """Parse one block's calls from after its trigger; where the block ends, None if open."""
    start = _skip(text, pos, fmt.open.strip())
    if start is None:
        return None
    end = _scan_calls(fmt, text, pos if start == _OTHER else start, calls)
    if end is None:
        return None
    after = _skip(text, end, fmt.close.strip())
    if after is None:
        return None
    if after == _OTHER:
        return end  # a block the model left unclosed ends here
    return _WS.match(text, after).end()  # type: ignore[union-attr]  # layout between blocks


def _scan_calls(fmt: ToolCallFormat, text: str, pos: int, calls: list[ToolCall]) -> int | None:
    """Parse calls separated by fmt.sep from pos; where the last ends, None if one is open."""
    while True:
        call, end = _scan_call(text, pos)
        if call.name is not None or end is not None:
            calls.append(call)
        if end is None:
            return None
        if fmt.sep is None:
            return end
        after = _skip(text, end, fmt.sep.strip())
        if after == _OTHER:
            return end
        if after is None or after == len(text):
            return None  # the text may still grow a separator, or the call after it
        pos = after


def _scan_call(text: str, pos: int) -> tuple[ToolCall, int | None]:
    """The call object at pos, and where it ends (None while it is open)."""
    pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    head = _HEAD.match(text, pos)
    if head is None:
        return _decode_call(text, pos)
    name = json.loads(f'"{head[1]}"')
    try:
        _, args_end = _DECODER.raw_decode(text, head.end())
    except json.JSONDecodeError:
        return ToolCall(name, text[head.end() :], False), None
    args = text[head.end() : args_end]
    end = _skip(text, args_end, "}")
    if end is None:
        return ToolCall(name, args, False), None
    if end == _OTHER:  # more keys than the grammar writes: read the object whole
        return _decode_call(text, pos)
    return ToolCall(name, args, True), end


def _decode_call(text: str, pos: int) -> tuple[ToolCall, int | None]:
    """A complete call object in any key order, its arguments re-serialized."""
    try:
        obj, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return ToolCall(None, "", False), None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, "", False), None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), True), end


_OTHER = -1  # _skip found something else than the literal


def _skip(text: str, pos: int, literal: str) -> int | None:
    """The position after whitespace and `literal` at pos; None if the text ends before it
    (or within it), _OTHER if something else follows."""
    pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    if text.startswith(literal, pos):
        return pos + len(literal)
    return None if literal.startswith(text[pos:]) else _OTHER


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that is a proper start of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
