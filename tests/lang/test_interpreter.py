"""The interpreter on a scripted fake backend: order, variables, forks, roles, errors, speculation."""

from __future__ import annotations

import re
import time

import pytest
from lang_helpers import FakeBackend

import radixlm as sgl
from radixlm.lang import REGEX_FLOAT, REGEX_INT, REGEX_STR
from radixlm.lang.backends.base import Prompt
from radixlm.lang.interpreter import match_segments
from radixlm.lang.ir import Gen, GenParams, Select, Text


def test_text_and_gen_build_the_prompt_in_order(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s, name):
        s += "Hello " + name + "."
        s += sgl.gen("x", max_tokens=5, stop="\n")
        s += "!"

    state = prog.run(name="Ann", backend=fake, temperature=0)
    assert state.text() == "Hello Ann.<gen>!"
    assert state["x"] == "<gen>"
    (kind, (prompt, params)), *_ = fake.calls
    assert kind == "generate" and prompt.text == "Hello Ann."
    assert (params.max_new_tokens, params.stop, params.temperature) == (5, ("\n",), 0)


def test_gen_arguments_override_run_defaults(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "a" + sgl.gen("x") + sgl.gen("y", temperature=0.5, stop=["."])

    prog.run(backend=fake, max_new_tokens=7, temperature=0.1, stop="\n")
    first, second = (c[1][1] for c in fake.calls)
    assert (first.max_new_tokens, first.temperature, first.stop) == (7, 0.1, ("\n",))
    assert (second.max_new_tokens, second.temperature, second.stop) == (7, 0.5, (".",))


def test_dtype_becomes_regex_and_stop(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "n=" + sgl.gen_int("n") + sgl.gen("f", dtype=float, stop=";") + sgl.gen_string("t")

    prog.run(backend=fake)
    n, f, t = (c[1][1] for c in fake.calls)
    assert n.regex == REGEX_INT and n.stop == (" ", "\n")
    assert f.regex == REGEX_FLOAT and f.stop == (";", " ", "\n")
    assert t.regex == REGEX_STR and not t.stop
    assert n.sampling_dict()["regex"] == REGEX_INT
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen(dtype=list)


def test_select_appends_the_decision(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "Pick:" + sgl.select("c", ["a", "bbb", "cc"])

    state = prog.run(backend=fake)
    assert state["c"] == "bbb" and state.text() == "Pick:bbb"
    assert state.get_meta_info("c")["normalized_prompt_logprobs"] == [-1.0, -1 / 3, -0.5]
    as_select = sgl.gen("c", choices=["x", "y"])  # gen(choices=) is a select
    assert isinstance(as_select, Select) and as_select.choices == ["x", "y"]


def test_roles_use_the_chat_template_and_record_messages(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Hi")
        s += sgl.assistant(sgl.gen("a"))
        with s.user():
            s += "Again"
        s += sgl.assistant_begin() + sgl.gen("b") + sgl.assistant_end()

    state = prog.run(backend=fake)
    assert state.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<gen>"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "<gen>"},
    ]
    assert state.text() == fake.chat_template.render(state.messages(), False)
    # The gen saw the prompt up to the open assistant message.
    assert fake.calls[0][1][0].text.endswith("<|im_start|>assistant\n")


def test_nested_roles_are_an_error(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        with s.user():
            s += sgl.assistant("x")

    with pytest.raises(RuntimeError, match="inside"):
        prog.run(backend=fake)


def test_var_scope_captures_text(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "before "
        with s.var_scope("v"):
            s += "{" + sgl.gen("x") + "}"
        s += " after"

    assert prog.run(backend=fake)["v"] == "{<gen>}"


def test_fork_prefills_once_then_runs_children_concurrently() -> None:
    fake = FakeBackend(reply=lambda p, _: p.text[-1], delay=0.3)

    @sgl.function
    def prog(s):
        s += "Shared prefix. "
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += str(i) + sgl.gen("x")
        forks.join()
        s += "|".join(forks[i]["x"] for i in range(3))

    t0 = time.perf_counter()
    state = prog.run(backend=fake)
    elapsed = time.perf_counter() - t0
    assert fake.kinds() == ["cache_prefix", "generate", "generate", "generate"]
    assert fake.calls[0][1] == "Shared prefix. "
    assert state["x"] == ["0", "1", "2"]  # gathered back in fork order
    assert state.text() == "Shared prefix. 0|1|2"
    assert elapsed < 0.8, f"three 0.3 s forks took {elapsed:.2f} s: they did not run concurrently"


def test_fork_group_append_forms_and_concat_join(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "Q. "
        forks = s.fork(2)
        forks += lambda i: f"[{i}]"
        forks += ["a", "b"]
        forks += "."
        forks.join(mode="concate_and_append")
        s += " end"

    assert prog.run(backend=fake).text() == "Q. [0]a.[1]b. end"


def test_nested_forks(fake: FakeBackend) -> None:
    @sgl.function
    def prog(s):
        s += "root "
        outer = s.fork(2)
        for i, f in enumerate(outer):
            f += f"o{i} "
            inner = f.fork(2)
            inner += lambda j: f"i{j}" + sgl.gen("leaf")
            inner.join()
        outer.join()

    state = prog.run(backend=fake)
    assert state["leaf"] == [["<gen>", "<gen>"], ["<gen>", "<gen>"]]
    prefills = [v for k, v in fake.calls if k == "cache_prefix"]
    assert prefills == ["root ", "root o0 ", "root o1 "] or sorted(prefills) == sorted(
        ["root ", "root o0 ", "root o1 "]
    )


def test_backend_error_is_raised_by_run_and_reported_by_run_batch() -> None:
    def reply(prompt: Prompt, params: GenParams) -> str:
        if "bad" in prompt.text:
            raise ValueError("boom")
        return "ok"

    @sgl.function
    def prog(s, word):
        s += word + sgl.gen("x")

    fake = FakeBackend(reply=reply)
    with pytest.raises(ValueError, match="boom"):
        prog.run(word="bad", backend=fake)
    states = prog.run_batch([{"word": "good"}, {"word": "bad"}], backend=fake)
    assert states[0]["x"] == "ok" and states[0].error() is None
    assert isinstance(states[1].error(), ValueError)
    with pytest.raises(ValueError, match="boom"):
        states[1]["x"]


def test_run_batch_caches_the_common_prefix_first(fake: FakeBackend) -> None:
    shots = "Q: 1+1?\nA: 2\n" * 8

    @sgl.function
    def prog(s, q):
        s += shots + "Q: " + q + "\nA:" + sgl.gen("a")

    states = prog.run_batch([("3+3?",), {"q": "4+4?"}, ["5+5?"]], backend=fake, num_threads=2)
    assert fake.calls[0] == ("cache_prefix", shots + "Q: ")
    assert fake.kinds()[1:] == ["generate"] * 3
    assert [s["a"] for s in states] == ["<gen>"] * 3
    assert {c[1][0].text for c in fake.calls[1:]} == {
        shots + f"Q: {q}\nA:" for q in ("3+3?", "4+4?", "5+5?")
    }


def test_run_batch_progress_bar(fake: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    """progress_bar=True draws a tqdm bar on stderr (count, rate; off a terminal too); results
    keep the batch's order."""

    @sgl.function
    def echo(s, q):
        s += q + sgl.gen("a")

    fake.reply = lambda prompt, params: prompt.text.upper()
    states = echo.run_batch([{"q": f"q{i}"} for i in range(5)], backend=fake, progress_bar=True)
    assert [s["a"] for s in states] == [f"Q{i}" for i in range(5)]
    err = capsys.readouterr().err
    assert re.search(r"echo: 100%\|.*\| 5/5 \[.*program/s\]", err), err
    echo.run_batch([{"q": "x"}], backend=fake)
    assert capsys.readouterr().err == ""


def test_streaming_yields_pieces_before_the_end() -> None:
    fake = FakeBackend(reply=lambda p, _: "one two three four", delay=0.05)

    @sgl.function
    def prog(s):
        s += "Say:" + sgl.gen("x")
        s += " done"

    state = prog.run(backend=fake, stream=True)
    pieces = list(state.text_iter("x"))
    assert pieces == ["one ", "two ", "three ", "four"]
    state = prog.run(backend=fake, stream=True)
    assert "".join(state.text_iter()) == "Say:one two three four done"
    assert prog.run(backend=fake).text_iter("x").__next__() == "one two three four"


def test_completion_speculation_serves_several_gens_from_one_call() -> None:
    fake = FakeBackend(reply=lambda p, _: " Ann\nAge: 41\nJob: pilot\nmore")

    @sgl.function(num_api_spec_tokens=32)
    def prog(s):
        s += "Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n")
        s += "\nJob:" + sgl.gen("job", stop="\n")

    state = prog.run(backend=fake)
    assert (state["name"], state["age"], state["job"]) == (" Ann", " 41", " pilot")
    assert fake.kinds() == ["generate"]
    params = fake.calls[0][1][1]
    assert params.stop is None and params.max_new_tokens == 128  # max(gen's, K)


def test_completion_speculation_falls_back_when_the_text_differs() -> None:
    fake = FakeBackend(reply=lambda p, _: " Ann\nSomething else\n")

    @sgl.function(num_api_spec_tokens=32)
    def prog(s):
        s += "Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n")

    state = prog.run(backend=fake)
    assert state["name"] == " Ann"
    assert fake.kinds() == ["generate", "generate"]  # "\nAge:" was not predicted: a new call
    assert fake.calls[1][1][0].text == "Name: Ann\nAge:"


def test_chat_speculation_fills_an_assistant_turn_with_one_call() -> None:
    fake = FakeBackend(reply=lambda p, _: "Name: Ann\nAge: 41")
    fake.is_chat_model = True

    @sgl.function(num_api_spec_tokens=64)
    def prog(s):
        s += sgl.user("Make a character.")
        s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age"))

    state = prog.run(backend=fake)
    assert (state["name"], state["age"]) == (" Ann", " 41")
    assert fake.kinds() == ["generate"]
    prompt, params = fake.calls[0][1]
    assert prompt.messages == [{"role": "user", "content": "Make a character."}]
    assert params.max_new_tokens == 64
    assert state.messages()[-1] == {"role": "assistant", "content": "Name: Ann\nAge: 41"}


def test_chat_model_without_speculation_needs_gen_right_after_assistant() -> None:
    fake = FakeBackend()
    fake.is_chat_model = True

    @sgl.function
    def prog(s):
        s += sgl.user("Hi")
        s += sgl.assistant("Sure:" + sgl.gen("x"))

    with pytest.raises(RuntimeError, match="assistant"):
        prog.run(backend=fake)


def test_match_segments() -> None:
    stop = GenParams(stop=("\n",))
    segs: list[Text | Gen] = [Text("A:"), Gen("a", stop), Text("\nB:"), Gen("b", GenParams())]
    assert match_segments(segs, "A: x\nB: y z") == ["A:", " x", "\nB:", " y z"]
    assert match_segments(segs, "B: y") is None
    # A gen without stop strings ends where the next constant text starts.
    segs = [Gen("a", GenParams()), Text(" | "), Gen("b", GenParams())]
    assert match_segments(segs, "left | right") == ["left", " | ", "right"]


def test_api_errors() -> None:
    with pytest.raises(ValueError, match="cannot read"):
        sgl.image("/nonexistent/cat.png")
    with pytest.raises(ValueError, match="temperature"):
        sgl.select("x", ["a"], temperature=0.5)
    with pytest.raises(ValueError):
        sgl.select("x", [])
    with pytest.raises(TypeError, match='"s"'):
        sgl.function(lambda state: None)
    with pytest.raises(TypeError):
        sgl.gen("x") + 3  # type: ignore[operator]

    @sgl.function
    def prog(s):
        s += None

    with pytest.raises(ValueError, match="None"):
        prog.run(backend=FakeBackend())
