"""A server on the embedded SmolLM2, where the text matters: chat answers, and SGLang's own client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from server_harness import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

QUESTION = "Q: What is the capital of France?\nA: The capital of France is"


@pytest.fixture(scope="module")
def smol(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("smol-server") / "server.log"
    srv = ServerProcess.start(smollm2_path, log, "--max-total-tokens", "8192")
    yield srv
    srv.stop()


def test_chat_answers_the_question(smol: ServerProcess) -> None:
    with openai.OpenAI(base_url=smol.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct.Q4_1"
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
        assert "Paris" in (r.choices[0].message.content or "")
        stream = client.completions.create(
            model=model, prompt=QUESTION, max_tokens=4, temperature=0, stream=True
        )
        assert "Paris" in "".join(c.choices[0].text for c in stream if c.choices)


def test_sglang_frontend_program(smol: ServerProcess) -> None:
    sgl = pytest.importorskip("sglang", reason="SGLang's frontend is not installed")

    @sgl.function
    def program(s: Any) -> None:
        s += QUESTION
        s += sgl.gen("city", max_tokens=6, stop="\n", temperature=0)
        s += "\nQ: Is Paris in Europe or in Asia?\nA: Paris is in"
        s += sgl.select("continent", choices=[" Europe", " Asia"])
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"\nFact {i + 1} about Paris:"
            f += sgl.gen("fact", max_tokens=8, stop="\n", temperature=0)
        forks.join()
        s += "\nDone."

    backend = sgl.RuntimeEndpoint(smol.url, api_key=API_KEY)
    state = program.run(backend=backend)
    assert "Paris" in state["city"]
    assert state["continent"] == " Europe"
    assert state.text().endswith("\nDone.")
    meta: dict[str, Any] = state.get_meta_info("city")
    assert meta["prompt_tokens"] > 0

    streamed = program.run(backend=backend, stream=True)
    text = "".join(streamed.text_iter("city"))
    assert "Paris" in text

    states = program.run_batch([{}, {}], backend=backend)
    assert all("Paris" in st["city"] for st in states)
    backend.flush_cache()


def test_sglang_runtime_endpoint_reads_model_info(smol: ServerProcess, smollm2_path: str) -> None:
    sgl = pytest.importorskip("sglang", reason="SGLang's frontend is not installed")
    endpoint = sgl.RuntimeEndpoint(smol.url, api_key=API_KEY)
    assert endpoint.get_model_name() == smollm2_path
    assert "internal_states" in endpoint.get_server_info()


def test_required_tool_call_matches_the_schema(smol: ServerProcess) -> None:
    import json

    import jsonschema

    params = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    with openai.OpenAI(base_url=smol.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=40,
            temperature=0,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ]
        r = client.chat.completions.create(
            model=model, messages=messages, tools=tools, max_tokens=16, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
