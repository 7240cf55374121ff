"""Tool-call parsing in each format, whole and streamed (every prefix of the text)."""

from __future__ import annotations

import pytest

from radixlm.server.chat_output import ChatOutput, ChatParsing
from radixlm.server.reasoning import REASONING_FORMATS, split_reasoning
from radixlm.server.tool_parser import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCall,
    ToolCallFormat,
    detect_format,
    parse_tool_calls,
)

ADD = '{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}'
PING = '{"name": "ping", "arguments": {}}'
CALLS = [ToolCall("add", '{"a": 1, "b": [2, "}"]}', True), ToolCall("ping", "{}", True)]
OUTPUTS = {
    HERMES: f"Sure.\n<tool_call>\n{ADD}\n</tool_call>\n<tool_call>\n{PING}\n</tool_call>",
    MISTRAL: f"Sure.[TOOL_CALLS][{ADD}, {PING}]",
    LLAMA3: f"{ADD}; {PING}".replace('"arguments"', '"parameters"'),
}


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_parse_whole_output(fmt: ToolCallFormat) -> None:
    parsed = parse_tool_calls(fmt, OUTPUTS[fmt])
    assert parsed.calls == CALLS
    assert parsed.content.rstrip() == ("" if fmt is LLAMA3 else "Sure.")


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_stream_deltas_add_up_to_the_message(fmt: ToolCallFormat) -> None:
    text = OUTPUTS[fmt]
    out = ChatOutput(ChatParsing(tools=fmt))
    content, names, args = "", {}, {}
    for end in range(len(text) + 1):
        delta = out.delta(text[:end], final=end == len(text))
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            fn = call["function"]
            if "name" in fn:
                assert call["index"] == len(names) and call["id"].startswith("call_")
                names[call["index"]] = fn["name"]
            args[call["index"]] = args.get(call["index"], "") + fn["arguments"]
    message = ChatOutput(ChatParsing(tools=fmt)).message(text)
    assert content == (message["content"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        (names[i], args[i]) for i in range(len(names))
    ]


def test_text_without_calls_is_content() -> None:
    for fmt in OUTPUTS:
        assert parse_tool_calls(fmt, "Hello <tool there").content == "Hello <tool there"
        assert parse_tool_calls(fmt, "Hello <tool there").calls == []
    # A stream holds back what may still become a trigger.
    assert parse_tool_calls(HERMES, "Hello <tool_c", final=False).content == "Hello "
    assert parse_tool_calls(LLAMA3, "<|python", final=False).content == ""
    assert parse_tool_calls(LLAMA3, "Say {x}").content == "Say {x}"


def test_python_tag_and_other_key_orders() -> None:
    parsed = parse_tool_calls(LLAMA3, '<|python_tag|>{"parameters": {"x": 1}, "name": "f"}')
    assert parsed.calls == [ToolCall("f", '{"x": 1}', True)]
    parsed = parse_tool_calls(HERMES, '<tool_call>\n{"name": "f", "arguments": {}, "id": 3}')
    assert parsed.calls == [ToolCall("f", "{}", True)]


def test_an_open_call_is_a_prefix_of_its_arguments() -> None:
    parsed = parse_tool_calls(HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1', False)
    assert parsed.calls == [ToolCall("add", '{"a": 1', False)]
    parsed = parse_tool_calls(HERMES, '<tool_call>\n{"name": "ad', False)
    assert parsed.calls == []


def test_detect_format_from_the_chat_template() -> None:
    assert detect_format("... <tool_call> ...") is HERMES
    assert detect_format("... [TOOL_CALLS] ...") is MISTRAL
    assert detect_format('{{ "<|python_tag|>" }}') is LLAMA3
    assert detect_format(None) is HERMES


def test_split_reasoning() -> None:
    qwen3, r1 = REASONING_FORMATS["qwen3"], REASONING_FORMATS["deepseek-r1"]
    assert split_reasoning(qwen3, "<think>\nhm</think>\n\nYes", opened=False) == ("hm", "Yes")
    assert split_reasoning(qwen3, "Yes", opened=False) == ("", "Yes")
    assert split_reasoning(r1, "hm</think>Yes", opened=True) == ("hm", "Yes")
    assert split_reasoning(r1, "hm, still", opened=True) == ("hm, still", "")
    assert split_reasoning(r1, "hm</thi", opened=True, final=False) == ("hm", "")
    assert split_reasoning(qwen3, "<thi", opened=False, final=False) == ("", "")
    assert r1.opened_by("...") and qwen3.opened_by("<|im_start|>assistant\n<think>\n")
    assert not qwen3.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_mode() -> None:
    qwen3, r1 = REASONING_FORMATS["qwen3"], REASONING_FORMATS["deepseek-r1"]
    assert qwen3.thinks("<|im_start|>assistant\n", {}) and r1.thinks("...<think>\n", {})
    assert not r1.thinks("...", {"enable_thinking": False})
    assert r1.thinks("...", {"enable_thinking": True})
    # A template that reads enable_thinking: false closes the reasoning in the prompt.
    assert not qwen3.thinks("<|im_start|>assistant\n<think>\n\n</think>\n\n", {})


def test_reasoning_then_calls_stream_like_the_message() -> None:
    parsing = ChatParsing(HERMES, REASONING_FORMATS["qwen3"], in_reasoning=True)
    text = f"Let me add.\n</think>\n\nOK.\n<tool_call>\n{ADD}\n</tool_call>"
    out = ChatOutput(parsing)
    parts: dict[str, str] = {}
    for end in range(len(text) + 1):
        for key, value in out.delta(text[:end], final=end == len(text)).items():
            if key != "tool_calls":
                parts[key] = parts.get(key, "") + value
    message = ChatOutput(parsing).message(text)
    assert message["reasoning_content"] == parts["reasoning_content"] == "Let me add.\n"
    assert message["content"] == parts["content"] == "OK."
    assert message["tool_calls"][0]["function"]["name"] == "add"
