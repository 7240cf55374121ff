"""Runtime: a server started from Python (SGLang's `sgl.Runtime`) on the tiny model; programs run
on it through set_default_backend, as they run in-process."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import radixlm as sgl
from radixlm.lang.program import get_default_backend

CHAT_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}<</{{ m['role'] }}>>\n"
    "{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}"
)
POOL = 4096


@pytest.fixture(scope="module")
def tiny(make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("runtime") / "tiny")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def runtime(tiny: Path, template: Path) -> Iterator[sgl.Runtime]:
    """The way SGLang's tutorials start one, plus a chat template and SGLang's metrics flag."""
    with sgl.Runtime(
        model_path=str(tiny),
        chat_template=str(template),
        max_total_tokens=POOL,
        enable_metrics=True,
    ) as rt:
        yield rt
    assert not _alive(rt.pid), "the server outlived the with block"


def _alive(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def _get(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@sgl.function
def chat(s, question):
    s += sgl.system("Be brief.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8))


def test_a_program_runs_on_the_default_runtime_as_in_process(
    runtime: sgl.Runtime, tiny: Path, template: Path
) -> None:
    before = get_default_backend()
    sgl.set_default_backend(runtime)
    try:
        state = chat.run(question="Hi?", temperature=0)
    finally:
        sgl.set_default_backend(before)
    # Roles come from the server's --chat-template, not the model's own template.
    assert state.text().startswith(
        "<<system>>Be brief.<</system>>\n<<user>>Hi?<</user>>\n<<assistant>>"
    )
    assert state.text().endswith("<</assistant>>\n")
    with sgl.Engine(str(tiny), chat_template=str(template), max_total_tokens=POOL) as engine:
        local = chat.run(question="Hi?", temperature=0, backend=engine)
    assert state.text() == local.text()
    assert state.get_meta_info("answer")["completion_tokens"] == 8


def test_the_server_runs_with_the_arguments_given(runtime: sgl.Runtime, template: Path) -> None:
    assert isinstance(runtime.endpoint, sgl.RuntimeEndpoint)
    assert runtime.generate_url == runtime.url + "/generate"
    info = runtime.endpoint.get_server_info()
    assert (info["max_total_num_tokens"], info["log_level"]) == (POOL, "error")
    assert info["chat_template"] == str(template)
    assert runtime.endpoint.model_info["chat_template"] == str(template.resolve())
    # --log-level error: the listening line (which ServerProcess reads) and no info lines.
    log = runtime.log_path.read_text()
    assert f"listening on {runtime.url}" in log
    assert "loading model" not in log and "KV slots" not in log
    # Metrics are on without --enable-metrics doing anything.
    with urllib.request.urlopen(runtime.url + "/metrics", timeout=10) as resp:
        assert b"sglang:num_requests_total" in resp.read()


def test_the_openai_chat_route_uses_the_chat_template(runtime: sgl.Runtime) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    out = _get(
        runtime.url + "/v1/chat/completions",
        {"messages": messages, "max_tokens": 2, "temperature": 0},
    )
    tokenizer = runtime.get_tokenizer()
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == "<<user>>Name a colour.<</user>>\n<<assistant>>"
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_generate_and_async_generate(runtime: sgl.Runtime) -> None:
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    out = json.loads(runtime.generate("The sky is", params))  # SGLang's: a JSON string
    assert out["meta_info"]["completion_tokens"] == 6

    async def stream() -> list[str]:
        return [piece async for piece in runtime.async_generate("The sky is", params)]

    assert "".join(asyncio.run(stream())) == out["text"]
    runtime.cache_prefix("A prefix worth keeping")
    again = json.loads(runtime.generate("A prefix worth keeping, twice", {"max_new_tokens": 1}))
    assert again["meta_info"]["cached_tokens"] > 0


def test_a_runtime_nobody_holds_is_shut_down(tiny: Path) -> None:
    runtime = sgl.Runtime(model_path=str(tiny), max_total_tokens=POOL)
    pid = runtime.pid
    assert _get(runtime.url + "/get_model_info")["model_path"] == str(tiny)
    runtime.shutdown()
    assert not _alive(pid)
    runtime.shutdown()  # again: nothing
    other = sgl.Runtime(model_path=str(tiny), max_total_tokens=POOL)
    pid = other.pid
    del other
    gc.collect()
    assert not _alive(pid)


def test_bad_arguments_fail_before_any_process_starts(tiny: Path) -> None:
    with pytest.raises(TypeError, match="unknown arguments: enable_dp_attention"):
        sgl.Runtime(model_path=str(tiny), enable_dp_attention=True)
    with pytest.raises(ValueError, match="mem_fraction_static"):
        sgl.Runtime(model_path=str(tiny), mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="log_level"):
        sgl.Runtime(model_path=str(tiny), log_level="loud")
