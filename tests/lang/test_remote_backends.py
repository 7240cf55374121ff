"""RuntimeEndpoint and OpenAI backends against our own server (SmolLM2), compared with in-process."""

from __future__ import annotations

from typing import Any

import pytest
from lang_helpers import Server

import radixlm as sgl
from radixlm.lang.backends.engine import EngineBackend

pytestmark = pytest.mark.slow
GREEDY: dict[str, Any] = {"temperature": 0}


@pytest.fixture(scope="module")
def endpoint(server: Server) -> sgl.RuntimeEndpoint:
    """The server's native API."""
    return sgl.RuntimeEndpoint(server.url)


@sgl.function
def mixed(s, topic):
    s += sgl.system("You answer in one short sentence.")
    s += sgl.user("Give me a fact about " + topic + ".")
    s += sgl.assistant(sgl.gen("fact", max_tokens=8))
    s += sgl.user("Is that true? Answer Yes or No.")
    with s.assistant():
        s += sgl.select("verdict", ["Yes", "No"])
    forks = s.fork(2)
    forks += lambda i: (
        sgl.user(f"Say the number {i + 1}.") + sgl.assistant(sgl.gen("n", max_tokens=4))
    )
    forks.join()


def test_same_program_same_greedy_text_in_process_and_over_http(
    engine: Any, endpoint: sgl.RuntimeEndpoint
) -> None:
    local = mixed.run(topic="the moon", backend=EngineBackend(engine), **GREEDY)
    remote = mixed.run(topic="the moon", backend=endpoint, **GREEDY)
    assert remote.text() == local.text()
    assert remote.messages() == local.messages()
    for name in ("fact", "verdict", "n"):
        assert remote[name] == local[name]
    assert remote.get_meta_info("verdict")["normalized_prompt_logprobs"] == pytest.approx(
        local.get_meta_info("verdict")["normalized_prompt_logprobs"], abs=1e-3
    )


def test_runtime_endpoint_control_calls(endpoint: sgl.RuntimeEndpoint) -> None:
    assert endpoint.get_model_name().endswith(".gguf")
    assert sgl.get_server_info(endpoint)["version"] == sgl.__version__
    assert sgl.flush_cache(endpoint) is True
    # The chat template came from the model file the server names.
    assert endpoint.chat_template.prefix_and_suffix("user", [])[0].startswith("<|im_start|>system")


def test_runtime_endpoint_streams(endpoint: sgl.RuntimeEndpoint) -> None:
    @sgl.function
    def count(s):
        s += "1, 2, 3," + sgl.gen("more", max_tokens=8)

    blocking = count.run(backend=endpoint, **GREEDY)
    streamed = count.run(backend=endpoint, stream=True, **GREEDY)
    pieces = list(streamed.text_iter("more"))
    assert len(pieces) > 1 and "".join(pieces) == blocking["more"]


@sgl.function(num_api_spec_tokens=32)
def character_spec(s):
    s += "Construct a character within the following format:\n"
    s += "Name: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n"
    s += "\nPlease generate new Name, Birthday and Job.\n"
    s += "Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n") + "\n"


character_no_spec = sgl.function(character_spec.func)


def test_completion_speculative_execution(server: Server) -> None:
    api = sgl.OpenAI(server.model, base_url=server.url + "/v1", is_chat_model=False)
    spec = character_spec.run(backend=api, max_new_tokens=16, **GREEDY)
    spec_usage = (api.token_usage.calls, api.token_usage.prompt_tokens)
    api.token_usage.reset()
    plain = character_no_spec.run(backend=api, max_new_tokens=16, **GREEDY)
    plain_usage = (api.token_usage.calls, api.token_usage.prompt_tokens)
    assert (spec["name"], spec["birthday"], spec["job"]) == (
        plain["name"],
        plain["birthday"],
        plain["job"],
    )
    assert spec.text() == plain.text()
    assert spec_usage[0] < plain_usage[0] == 3
    assert spec_usage[1] < plain_usage[1]


def test_chat_speculative_execution(server: Server) -> None:
    api = sgl.OpenAI(server.model, base_url=server.url + "/v1")

    @sgl.function(num_api_spec_tokens=12)
    def colors(s):
        s += sgl.user("List two colors, one per line.")
        s += sgl.assistant(sgl.gen("first", stop="\n") + "\n" + sgl.gen("rest"))

    state = colors.run(backend=api, **GREEDY)
    assert api.token_usage.calls == 1
    reply = api.client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "List two colors, one per line."}],
        max_tokens=12,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert "\n" in text
    assert state["first"] + "\n" + state["rest"] == text
    assert state.messages()[-1] == {"role": "assistant", "content": text}


def test_openai_chat_gen_and_completion_select(
    server: Server, endpoint: sgl.RuntimeEndpoint
) -> None:
    chat_api = sgl.OpenAI(server.model, base_url=server.url + "/v1")

    @sgl.function
    def qa(s):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=12))

    assert "Paris" in qa.run(backend=chat_api, **GREEDY)["answer"]

    @sgl.function
    def pick(s):
        s += "Statement: Paris is in France.\nAnswer:" + sgl.select("a", ["True", "False", "Maybe"])

    completion_api = sgl.OpenAI(server.model, base_url=server.url + "/v1", is_chat_model=False)
    via_openai = pick.run(backend=completion_api)
    native = pick.run(backend=endpoint)
    assert via_openai["a"] == native["a"]
    assert via_openai.get_meta_info("a")["normalized_prompt_logprobs"] == pytest.approx(
        native.get_meta_info("a")["normalized_prompt_logprobs"], abs=1e-3
    )
    with pytest.raises(NotImplementedError, match="chat"):
        pick.run(backend=chat_api)


def test_typed_gen_over_http_matches_in_process(engine: Any, endpoint: sgl.RuntimeEndpoint) -> None:
    @sgl.function
    def year(s):
        s += "Q: In which year did the Apollo 11 mission land on the Moon?\nA: " + sgl.gen_int("y")

    local = year.run(backend=EngineBackend(engine), max_new_tokens=6, **GREEDY)
    remote = year.run(backend=endpoint, max_new_tokens=6, **GREEDY)
    assert remote["y"] == local["y"]
    int(remote["y"])
