"""The grammar (llguidance's Lark syntax) that makes a model's tool calls always parse.

`required` and a named function allow calls only; `auto` lets free text run and constrains a
call from its trigger on (a lazy lexeme ends the text at the trigger's first occurrence). Each
call is a JSON object whose arguments match the function's parameter schema, with the same
fixed separators as `json_schema` outputs, so the layout between values is forced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixlm.grammar.llguidance_grammar import JSON_DEFAULTS
from radixlm.server.reasoning import ReasoningFormat
from radixlm.server.reasoning_grammar import reasoning_start
from radixlm.server.tool_parser import ToolCallFormat

_TEXT = r"TEXT: /(.|\n)*/"
_PLAIN = r"PLAIN: /([^{](.|\n)*)?/"  # Llama 3: text is an output that does not open a call


@dataclass(frozen=True, slots=True)
class Function:
    """A function the model may call: its name and its parameters' JSON schema."""

    name: str
    parameters: dict[str, Any]


def tool_grammar(
    fmt: ToolCallFormat,
    functions: Sequence[Function],
    required: bool,
    parallel: bool,
    trigger_token: int | None = None,
    reasoning: ReasoningFormat | None = None,
    in_reasoning: bool = False,
) -> str:
    """The Lark grammar of an output in `fmt` calling `functions` (at least one call if
    `required`, several if `parallel`). `trigger_token` is the id of a trigger that is a special
    token (matched as that token, not as text). With `reasoning`, the output may first reason
    freely (it does when `in_reasoning`: the prompt opened it); the calls come after."""
    call = json.dumps(_call_schema(fmt, functions), ensure_ascii=False)
    calls = "call" if fmt.sep is None or not parallel else f"call ({json.dumps(fmt.sep)} call)*"
    trigger = f"<[{trigger_token}]>" if trigger_token is not None else json.dumps(fmt.trigger)
    block = " ".join([*_literal(fmt.open), "calls", *_literal(fmt.close)])
    rules = [f"call: %json {call}", f"calls: {calls}"]
    if not fmt.trigger:  # the calls are the whole output
        body = "calls" if required else "PLAIN | calls"
        rules.append(_PLAIN)
        block = "calls"
    elif required:
        repeat = (
            f" ({json.dumps(fmt.between)} {trigger} block)*" if fmt.between and parallel else ""
        )
        body = f"{trigger} block{repeat}"
    else:
        # A special token cannot occur in TEXT, so it needs no lazy lexeme to end the text.
        lazy = "" if trigger_token is not None else "[lazy]"
        rules.append(f"opened{lazy}: TEXT {trigger}")
        body = "(opened block)* TEXT" if parallel else "TEXT | opened block"
    rules += [f"block: {block}", _TEXT]
    start = (
        [f"start: {body}"] if reasoning is None else reasoning_start(reasoning, in_reasoning, body)
    )
    return "\n".join(["%llguidance {}", *start, *rules]) + "\n"


def _literal(text: str) -> list[str]:
    return [json.dumps(text)] if text else []


def _call_schema(fmt: ToolCallFormat, functions: Sequence[Function]) -> dict[str, Any]:
    """One call: {"name": <a function's name>, ARGS: <that function's parameters>}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, fmt.args_key: f.parameters},
            "required": ["name", fmt.args_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": dict(JSON_DEFAULTS)}
