"""image() in programs on a tiny LLaVA: forks share the image (one encoder run, its K/V cached
once), and each gen and select equals direct calls with the same text and image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from image_helpers import write_test_image
from lang_helpers import FakeBackend

import radixlm as sgl
from radixlm.engine.engine import Engine
from radixlm.lang.backends.engine import EngineBackend

GEN = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path) -> Iterator[Engine]:
    with Engine(str(tiny_llava_dir), max_total_tokens=2048, random_seed=0) as e:
        yield e


@sgl.function
def ask_about(s, path, questions):
    s += "Picture: " + sgl.image(path) + "\n"
    forks = s.fork(len(questions))
    for f, q in zip(forks, questions, strict=True):
        f += "Q: " + q + "\nA:" + sgl.gen("answer", max_tokens=5, temperature=0, ignore_eos=True)
    forks.join()
    s += "Colour: " + sgl.select("colour", choices=["red", "green", "blue"])
    return forks


def test_forks_share_the_image(llava: Engine, tmp_path: Path) -> None:
    path = write_test_image(tmp_path / "a.png", (64, 48), 3)
    spec = llava.info.image
    assert spec is not None
    llava.flush_cache()
    model: Any = llava.core.runner.model
    encoded = model.images_encoded
    questions = ["What is it?", "Where is it?", "Why?"]
    state = ask_about.run(path=str(path), questions=questions, backend=EngineBackend(llava))
    prefix = "Picture: <image>\n"
    image_end = llava.tokenizer.encode(prefix).index(spec.token_id) + spec.num_tokens
    for fork, q in zip(state.ret_value, questions, strict=True):
        direct = llava.generate(f"{prefix}Q: {q}\nA:", GEN, image_data=str(path))
        assert isinstance(direct, dict)
        assert fork["answer"] == direct["text"]
        # The fork's shared prefix, image included, was prefilled once before the forks ran.
        assert fork.get_meta_info("answer")["cached_tokens"] >= image_end
    assert state["colour"] in ("red", "green", "blue")
    assert model.images_encoded - encoded == 1
    llava.check_invariant()


def test_select_after_an_image_scores_as_direct_calls(llava: Engine, tmp_path: Path) -> None:
    path = write_test_image(tmp_path / "b.png", (40, 40), 4)

    @sgl.function
    def pick(s):
        s += sgl.image(str(path)) + " This is"
        s += sgl.select("c", choices=[" a cat", " a dog", " nothing"])

    state = pick.run(backend=EngineBackend(llava))
    scores = []
    for choice in (" a cat", " a dog", " nothing"):
        base = llava.generate("<image> This is", {"max_new_tokens": 0}, image_data=str(path))
        assert isinstance(base, dict)
        start = base["meta_info"]["prompt_tokens"]
        out = llava.generate(
            "<image> This is" + choice,
            {"max_new_tokens": 0},
            image_data=str(path),
            return_logprob=True,
            logprob_start_len=start,
        )
        assert isinstance(out, dict)
        lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
        scores.append(sum(lps) / len(lps))
    assert state["c"] == (" a cat", " a dog", " nothing")[scores.index(max(scores))]


def test_image_needs_a_model_that_takes_images(fake: FakeBackend, tmp_path: Path) -> None:
    path = write_test_image(tmp_path / "c.png", (8, 8), 5)

    @sgl.function
    def prog(s):
        s += "x" + sgl.image(str(path))

    with pytest.raises(ValueError, match="takes no images"):
        prog.run(backend=fake)
