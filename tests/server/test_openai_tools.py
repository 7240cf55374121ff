"""Tool calling through the real `openai` client: a tiny model whose chat template takes tools
(Hermes style), a two-step tool loop, arguments checked with jsonschema, streamed deltas against
the whole answer; and the prompt the template renders."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from server_harness import API_KEY, TINY_POOL, ServerProcess

from radixlm.server.openai_api import chat_prompt
from radixlm.server.openai_protocol import ChatCompletionRequest
from radixlm.tokenizer import Tokenizer

# Qwen 2.5's way of offering tools and reading calls back, written small.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages if m.role != 'system' %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_model(tiny_server_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-tools"
    shutil.copytree(tiny_server_model, path)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def client(tools_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("tools-server") / "server.log"
    srv = ServerProcess.start(tools_model, log, "--max-total-tokens", str(TINY_POOL))
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    params: dict[str, Any] = {"model": "tiny-tools", "temperature": 0, "max_tokens": 120}
    return client.chat.completions.create(**{**params, **kw})


def check_calls(calls: list[Any]) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_two_step_tool_loop(client: openai.OpenAI) -> None:
    r = chat(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = chat(client, messages=history, tools=TOOLS, max_tokens=8, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_named_function_is_called(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = chat(client, messages=ASK, tools=TOOLS, tool_choice=named)
    calls = r.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    check_calls(calls if r.choices[0].finish_reason == "tool_calls" else calls[:-1])


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_calls_add_up_to_the_answer(client: openai.OpenAI, parallel: bool) -> None:
    kw: dict[str, Any] = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": parallel,
    }
    whole = chat(client, **kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in chat(client, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            if c.id is not None:
                assert c.index == len(calls) and c.type == "function"
                calls[c.index] = {"name": c.function.name, "arguments": ""}
            calls[c.index]["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert [calls[i] for i in range(len(calls))] == [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls
    ]
    done = whole.message.tool_calls if finish == "tool_calls" else whole.message.tool_calls[:-1]
    check_calls(done)
    if not parallel:
        assert len(whole.message.tool_calls) == 1


def test_auto_lets_the_model_answer_in_text(client: openai.OpenAI) -> None:
    r = chat(client, messages=ASK, tools=TOOLS, max_tokens=12)
    message = r.choices[0].message
    # The random model writes text; had it opened a call, the grammar would have shaped it.
    check_calls(message.tool_calls or [])
    assert isinstance(message.content, str) or message.tool_calls


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400(client: openai.OpenAI, kw: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=ASK, **kw)
    assert e.value.body["param"] == param  # type: ignore[index]


def test_tools_and_calls_reach_the_chat_template(tools_model: Path) -> None:
    tok = Tokenizer.load(str(tools_model))
    body = {
        "messages": [
            *ASK,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": TOOLS,
    }
    text, ids = chat_prompt(ChatCompletionRequest.model_validate(body), tok)
    assert json.dumps(WEATHER["function"]["parameters"]) in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert ids == tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def r1_client(
    tools_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    """A server with `--reasoning-parser deepseek-r1`: every output starts in its reasoning."""
    log = tmp_path_factory.mktemp("reasoning-server") / "server.log"
    srv = ServerProcess.start(
        tools_model, log, "--max-total-tokens", str(TINY_POOL), "--reasoning-parser", "deepseek-r1"
    )
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
            yield c
    finally:
        assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def streamed_message(client: openai.OpenAI, **kw: Any) -> tuple[str, str]:
    """(reasoning_content, content) of a stream, its deltas added up."""
    thought = content = ""
    for chunk in chat(client, stream=True, **kw):
        delta = chunk.choices[0].delta
        thought += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    return thought, content


def test_reasoning_parser_moves_the_thought(r1_client: openai.OpenAI) -> None:
    whole = chat(r1_client, messages=ASK, max_tokens=12).choices[0].message
    # DeepSeek-R1 starts in its reasoning; the random model never closes it.
    assert not whole.content
    thought = whole.reasoning_content  # type: ignore[attr-defined]
    assert isinstance(thought, str) and thought
    assert streamed_message(r1_client, messages=ASK, max_tokens=12) == (thought, "")


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Lima"]}, "ok": {"type": "boolean"}},
    "required": ["city", "ok"],
    "additionalProperties": False,
}
STRUCTURED: list[dict[str, Any]] = [
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": ANSWER_SCHEMA},
        }
    },
    {"response_format": {"type": "json_object"}},
    {"extra_body": {"regex": "(yes|no), [0-9]{2}"}},
    {"extra_body": {"ebnf": 'root ::= "The answer is " ("yes" | "no") "."'}},
]


def check_structured(kw: dict[str, Any], content: str) -> None:
    fmt = kw.get("response_format")
    if fmt is not None:
        schema = ANSWER_SCHEMA if fmt["type"] == "json_schema" else {"type": "object"}
        jsonschema.validate(json.loads(content), schema)
    elif "regex" in kw["extra_body"]:
        assert re.fullmatch(kw["extra_body"]["regex"], content), content
    else:
        assert re.fullmatch("The answer is (yes|no)\\.", content), content


@pytest.mark.parametrize("kw", STRUCTURED)
def test_structured_output_comes_after_the_reasoning(
    r1_client: openai.OpenAI, kw: dict[str, Any]
) -> None:
    free = chat(r1_client, messages=ASK, max_tokens=12).choices[0].message
    whole = chat(r1_client, messages=ASK, max_tokens=12, **kw).choices[0].message
    # The reasoning runs free (the random model never ends it): the same greedy thought.
    assert whole.reasoning_content == free.reasoning_content  # type: ignore[attr-defined]
    assert not whole.content
    assert streamed_message(r1_client, messages=ASK, max_tokens=12, **kw) == (
        free.reasoning_content,  # type: ignore[attr-defined]
        "",
    )


@pytest.mark.parametrize("kw", STRUCTURED)
def test_without_thinking_structured_output_starts_at_once(
    r1_client: openai.OpenAI, kw: dict[str, Any]
) -> None:
    body = {**kw.get("extra_body", {}), "chat_template_kwargs": {"enable_thinking": False}}
    kw = {**kw, "extra_body": body}
    whole = chat(r1_client, messages=ASK, max_tokens=60, **kw).choices[0].message
    assert getattr(whole, "reasoning_content", None) is None
    check_structured(kw, whole.content)
    assert streamed_message(r1_client, messages=ASK, max_tokens=60, **kw) == ("", whole.content)


def test_a_bad_answer_grammar_is_a_400_naming_its_field(r1_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(r1_client, messages=ASK, extra_body={"regex": "(unclosed"})
    assert e.value.body["param"] == "regex"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # two grammars: SamplingParams' 400
        chat(r1_client, messages=ASK, extra_body={"regex": "a", "ebnf": 'root ::= "a"'})
