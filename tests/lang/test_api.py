"""The public surface: light imports, argument binding, state copies, OpenAI request mapping."""

from __future__ import annotations

import subprocess
import sys

from lang_helpers import FakeBackend

import radixlm as sgl
from radixlm.lang.backends.openai import _openai_kwargs
from radixlm.lang.ir import GenParams


def test_language_names_import_without_torch() -> None:
    code = (
        "import sys, radixlm\n"
        "for name in ('function', 'gen', 'select', 'RuntimeEndpoint', 'OpenAI', 'user'):\n"
        "    getattr(radixlm, name)\n"
        "assert 'torch' not in sys.modules and 'openai' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bind_positional_args_and_call(fake: FakeBackend) -> None:
    @sgl.function
    def greet(s, greeting, name):
        s += greeting + ", " + name + "." + sgl.gen("x")

    hello = greet.bind(greeting="Hello")
    assert hello(name="Ann", backend=fake).text() == "Hello, Ann.<gen>"
    assert greet.run("Hi", "Bo", backend=fake).text() == "Hi, Bo.<gen>"
    states = greet.run_batch([("Hey", "Cy")], backend=fake)
    assert states[0].text() == "Hey, Cy.<gen>"


def test_copy_joins_back_new_variables(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "Base."
        with s.copy() as c:
            c += " Side" + sgl.gen("side")
        s += " Main"

    state = prog.run(backend=fake)
    assert state.text() == "Base. Main"
    assert state["side"] == ["<gen>"]


def test_openai_kwargs_send_extras_only_when_used() -> None:
    defaults = GenParams(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0)
    assert _openai_kwargs(defaults) == {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0}
    p = GenParams(
        max_new_tokens=8,
        stop=("\n",),
        top_k=5,
        min_new_tokens=2,
        regex="[0-9]+",
        json_schema=None,
        ignore_eos=True,
    )
    kwargs = _openai_kwargs(p)
    assert kwargs["stop"] == ["\n"] and kwargs["max_tokens"] == 8
    assert kwargs["extra_body"] == {
        "top_k": 5,
        "min_tokens": 2,
        "regex": "[0-9]+",
        "ignore_eos": True,
    }
    schema = _openai_kwargs(GenParams(json_schema='{"type": "object"}'))["response_format"]
    assert schema == {
        "type": "json_schema",
        "json_schema": {"name": "schema", "schema": {"type": "object"}},
    }
