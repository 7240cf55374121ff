"""Reasoning formats (`--reasoning-parser`): the `<think>...</think>` part before the answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from radixlm.server.tool_parser import partial_suffix


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning; `always`: the output starts inside it even when the
    model writes no start tag (DeepSeek-R1's template opens it in the prompt)."""

    name: str
    always: bool
    start: str = "<think>"
    end: str = "</think>"

    def opened_by(self, prompt: str) -> bool:
        """Whether a prompt leaves the model inside its reasoning (the template opened it)."""
        return self.always or prompt.rstrip().endswith(self.start)

    def thinks(self, prompt: str, template_kwargs: Mapping[str, Any]) -> bool:
        """Whether a request is in reasoning mode: not when it turned thinking off
        (`enable_thinking: false`) or the template closed the reasoning in the prompt."""
        off = template_kwargs.get("enable_thinking") is False
        return not off and not prompt.rstrip().endswith(self.end)


REASONING_FORMATS = {
    "qwen3": ReasoningFormat("qwen3", always=False),
    "deepseek-r1": ReasoningFormat("deepseek-r1", always=True),
}


def split_reasoning(
    fmt: ReasoningFormat, text: str, opened: bool, final: bool = True
) -> tuple[str, str]:
    """(reasoning, answer) of an output; with final=False both stop short of a tag the text
    may still be writing, so that each only grows as the text does."""
    stripped = text.lstrip()
    if stripped.startswith(fmt.start):
        text, opened = stripped[len(fmt.start) :], True
    elif not final and stripped and fmt.start.startswith(stripped):
        return "", ""
    if not opened:
        return "", text
    end = text.find(fmt.end)
    if end < 0:
        return (text if final else text[: len(text) - partial_suffix(text, fmt.end)]).lstrip(), ""
    return text[:end].lstrip(), text[end + len(fmt.end) :].lstrip()
