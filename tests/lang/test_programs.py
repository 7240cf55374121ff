"""SGLang's test programs on the embedded SmolLM2, in-process, checked against direct generate calls."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

import radixlm as sgl
from radixlm.lang import REGEX_INT
from radixlm.lang.backends.engine import EngineBackend

pytestmark = pytest.mark.slow

GREEDY: dict[str, Any] = {"temperature": 0}


@pytest.fixture(scope="module")
def backend(engine: Any) -> EngineBackend:
    """The in-process backend over the shared engine."""
    return EngineBackend(engine)


def direct(engine: Any, prompt: str, **params: Any) -> dict[str, Any]:
    """One greedy generate call, the reference a program's gen must equal."""
    out = engine.generate(prompt, {"temperature": 0, **params})
    assert isinstance(out, dict)
    return out


@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of France?\nA: Paris\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=8)


def test_few_shot_qa(engine: Any, backend: EngineBackend) -> None:
    state = few_shot_qa.run(question="What is the capital of Japan?", backend=backend, **GREEDY)
    prompt = state.text()[: -len(state["answer"])]
    assert state["answer"] == direct(engine, prompt, max_new_tokens=8, stop="\n")["text"]
    assert state["answer"].strip() == "Tokyo"
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] == "stop" and meta["prompt_tokens"] > 0


def test_run_batch_caches_the_shared_prefix_and_matches_run(
    engine: Any, backend: EngineBackend
) -> None:
    questions = [
        "What is the capital of Japan?",
        "What is the capital of the United Kingdom?",
        "What is the capital city of China?",
    ]
    assert engine.flush_cache()
    states = few_shot_qa.run_batch([{"question": q} for q in questions], backend=backend, **GREEDY)
    answers = [s["answer"].strip() for s in states]
    assert answers == ["Tokyo", "London", "Beijing"]
    shared = len(
        engine.tokenizer.encode(states[0].text().split("Q: What is the capital of Japan")[0])
    )
    for s in states:
        # Every program found the few-shot examples cached (by run_batch's prefix call).
        assert s.get_meta_info("answer")["cached_tokens"] >= shared - 2
    single = few_shot_qa.run(question=questions[1], backend=backend, **GREEDY)
    assert single["answer"].strip() == answers[1]


def test_multi_turn_chat(engine: Any, backend: EngineBackend) -> None:
    @sgl.function
    def chat(s, q1, q2):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(q1)
        s += sgl.assistant(sgl.gen("answer_1", max_tokens=16))
        with s.user():
            s += q2
        with s.assistant():
            s += sgl.gen("answer_2", max_tokens=8)

    state = chat.run(
        q1="What is the capital of France?", q2="And of Spain?", backend=backend, **GREEDY
    )
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    tok = engine.tokenizer
    assert state.text() == tok.apply_chat_template(messages, add_generation_prompt=False)
    first_prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert state["answer_1"] == direct(engine, first_prompt, max_new_tokens=16)["text"]
    assert "Paris" in state["answer_1"]


@sgl.function
def true_or_false(s, statement, method=sgl.token_length_normalized):
    s += "Determine whether the statement below is True, False, or Unknown.\n"
    s += "Statement: The capital of France is Pairs.\nAnswer: True\n"
    s += "Statement: " + statement + "\n"
    s += "Answer:" + sgl.select("answer", ["True", "False", "Unknown"], choices_method=method)


def choice_logprobs(engine: Any, prefix: str, choice: str) -> list[float]:
    """The logprobs of the choice's own tokens after the prefix, by a direct generate call."""
    prefix_ids = engine.tokenizer.encode(prefix)
    full_ids = engine.tokenizer.encode(prefix + choice)
    assert full_ids[: len(prefix_ids)] == prefix_ids  # the boundary is a token boundary here
    out = engine.generate(
        prefix + choice,
        {"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=len(prefix_ids),
    )
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]


@pytest.mark.parametrize(
    "method",
    [
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ],
    ids=lambda m: type(m).__name__,
)
def test_select_matches_direct_logprobs(engine: Any, backend: EngineBackend, method: Any) -> None:
    state = true_or_false.run(
        statement="The capital of Germany is Berlin.", method=method, backend=backend
    )
    meta = state.get_meta_info("answer")
    prefix = state.text()[: -len(state["answer"])]
    choices = ["True", "False", "Unknown"]
    expected = [choice_logprobs(engine, prefix, c) for c in choices]
    got = [[t[0] for t in toks] for toks in meta["input_token_logprobs"]]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-3)
    means = [sum(e) / len(e) for e in expected]
    assert meta["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-3)
    if method is sgl.token_length_normalized:
        assert state["answer"] == choices[means.index(max(means))]
    elif method is sgl.unconditional_likelihood_normalized:
        values = meta["normalized_unconditional_prompt_logprobs"]
        assert state["answer"] == choices[values.index(max(values))]
    assert state["answer"] in choices and state.text().endswith("Answer:" + state["answer"])


def test_decode_int(engine: Any, backend: EngineBackend) -> None:
    shots = "Q: How many legs does a dog have?\nA: 4\nQ: How many days are in a week?\nA: 7\n"

    @sgl.function
    def decode_int(s):
        s += shots + "Q: How many days are in a year?\nA: " + sgl.gen_int("days") + "\n"
        s += "Q: How many hours are in a day?\nA: " + sgl.gen_int("hours") + "\n"

    state = decode_int.run(backend=backend, max_new_tokens=8, **GREEDY)
    assert int(state["days"]) == 365
    prompt = state.text()[
        : state.text().index("Q: How many hours") + len("Q: How many hours are in a day?\nA: ")
    ]
    params = {"max_new_tokens": 8, "stop": [" ", "\n"], "regex": REGEX_INT}
    assert state["hours"] == direct(engine, prompt, **params)["text"]
    int(state["hours"])


def test_regex(backend: EngineBackend) -> None:
    regex = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"

    @sgl.function
    def regex_gen(s):
        s += "Q: What is the IP address of the Google DNS servers?\n"
        s += "A: " + sgl.gen("answer", regex=regex, max_tokens=24)

    state = regex_gen.run(backend=backend, **GREEDY)
    assert re.fullmatch(regex, state["answer"])


def test_json_schema(backend: EngineBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }

    @sgl.function
    def person(s):
        s += "Describe Ada Lovelace as JSON with her name and age at death.\n"
        s += sgl.gen("json", json_schema=schema, max_tokens=48)

    value = json.loads(person.run(backend=backend, **GREEDY)["json"])
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_dtype_gen(backend: EngineBackend) -> None:
    @sgl.function
    def dtype_gen(s):
        s += "Q: What is the full name of DNS?\n"
        s += "A: The full name is " + sgl.gen("str_res", dtype=str, stop="\n") + "\n"
        s += "Q: Which year was DNS invented?\nA: " + sgl.gen("int_res", dtype=int) + "\n"
        s += "Q: What is the value of pi?\nA: " + sgl.gen("float_res", dtype=float) + "\n"
        s += "Q: Is the sky blue?\nA: " + sgl.gen("bool_res", dtype=bool) + "\n"

    state = dtype_gen.run(backend=backend, max_new_tokens=24, **GREEDY)
    assert re.fullmatch(r'"[\w\d\s]*"', state["str_res"])
    int(state["int_res"])
    float(state["float_res"])
    assert state["bool_res"] in ("True", "False")


def test_fork_parallel_decoding(engine: Any, backend: EngineBackend) -> None:
    @sgl.function
    def parallel(s, topic):
        s += "Act as a helpful assistant.\nUSER: Give some tips for " + topic + ".\n"
        s += "ASSISTANT: Okay. Here are 3 concise tips, each under 8 words:\n"
        forks = s.fork(3)
        for i in range(3):
            forks[i] += f"{i + 1}." + sgl.gen("tip", max_tokens=12, stop=["\n", "."])
        forks.join()
        s += "Tips:" + "|".join(forks[i]["tip"] for i in range(3))
        return forks

    assert engine.flush_cache()
    state = parallel.run(topic="writing a good blog post", backend=backend, **GREEDY)
    tips = state["tip"]
    assert len(tips) == 3
    shared = state.text().split("Tips:")[0]
    shared_tokens = len(engine.tokenizer.encode(shared))
    for i, (tip, fork) in enumerate(zip(tips, state.ret_value, strict=True)):
        prompt = shared + f"{i + 1}."
        assert tip == direct(engine, prompt, max_new_tokens=12, stop=["\n", "."])["text"]
        # The shared text was prefilled once, before the forks ran: each found it cached.
        assert fork.get_meta_info("tip")["cached_tokens"] >= shared_tokens - 1
    assert state.text().endswith("Tips:" + "|".join(tips))


def test_streaming_matches_the_blocking_run(backend: EngineBackend) -> None:
    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=16))

    blocking = qa.run(question="Name three colors.", backend=backend, **GREEDY)
    streamed = qa.run(question="Name three colors.", backend=backend, stream=True, **GREEDY)
    pieces = list(streamed.text_iter("answer"))
    assert len(pieces) > 1
    assert "".join(pieces) == blocking["answer"]
    streamed = qa.run(question="Name three colors.", backend=backend, stream=True, **GREEDY)
    assert "".join(streamed.text_iter()) == blocking.text()


def test_min_new_tokens(backend: EngineBackend) -> None:
    @sgl.function
    def convo(s, min_tokens):
        s += sgl.user("What is 1+1? Answer with one number.")
        s += sgl.assistant(sgl.gen("answer", min_tokens=min_tokens, max_tokens=24))

    short = convo.run(min_tokens=None, backend=backend, **GREEDY)
    n = short.get_meta_info("answer")["completion_tokens"]
    assert short.get_meta_info("answer")["finish_reason"]["type"] == "stop" and n < 12
    longer = convo.run(min_tokens=n + 6, backend=backend, **GREEDY)
    assert longer.get_meta_info("answer")["completion_tokens"] >= n + 6
    assert longer["answer"].startswith(short["answer"])


def test_set_default_backend_accepts_an_engine(engine: Any) -> None:
    sgl.set_default_backend(engine)
    try:
        state = few_shot_qa.run(question="What is the capital of Japan?", **GREEDY)
        assert state["answer"].strip() == "Tokyo"
    finally:
        sgl.set_default_backend(None)
    with pytest.raises(ValueError, match="no backend"):
        few_shot_qa.run(question="?")


def test_gen_returns_logprobs(backend: EngineBackend) -> None:
    @sgl.function
    def scored(s):
        s += "The capital of France is" + sgl.gen(
            "x", max_tokens=3, return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True
        )

    meta = scored.run(backend=backend, **GREEDY).get_meta_info("x")
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] == 3
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    # Greedy: each chosen token is the most likely one.
    assert [t[1] for t in meta["output_token_logprobs"]] == [
        top[0][1] for top in meta["output_top_logprobs"]
    ]
