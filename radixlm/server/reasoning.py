"""Reasoning formats (`--reasoning-parser`): the `<think>...</think>` part before the answer."""

from __future__ import annotations

from dataclasses import dataclass

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
