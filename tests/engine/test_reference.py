"""The engine on SmolLM2 against Hugging Face transformers: greedy tokens and logprobs.

Greedy equality is checked by teacher forcing: transformers scores the prompt plus the engine's
output in one forward, and every output token must be the argmax at its position. By induction
that is exactly "transformers' greedy decoding produces the same tokens", at the cost of one
forward instead of one per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hf_reference import hf_logprobs, load_hf_smollm2

from radixlm.core.plan import ScheduledSeq
from radixlm.engine.engine import Engine
from radixlm.models import layers

pytestmark = pytest.mark.slow

# Both sides run float32 with the same weights; they differ only in summation order (fused q/k/v
# and gate/up GEMMs, paged attention vs SDPA, batch shapes), which moves SmolLM2's logits (|x| up
# to ~30, 30 layers) by ~1e-5: the largest logprob difference seen is 2e-5. 1e-4 leaves 5x
# headroom and is still far below what a real bug (a wrong position, token, row or mask) causes.
LOGPROB_ATOL = 1e-4
NEW_TOKENS = 16

FEW_SHOT = (
    "Answer each question with one word.\n"
    "Q: What colour is the sky on a clear day? A: Blue\n"
    "Q: What is the opposite of hot? A: Cold\n"
    "Q: Which animal says moo? A: Cow\n"
)


@pytest.fixture(scope="module")
def hf(pytestconfig: pytest.Config, smollm2_path: str) -> Any:
    return load_hf_smollm2(pytestconfig, smollm2_path)


@pytest.fixture(scope="module")
def engine(smollm2_path: str) -> Iterator[Engine]:
    with Engine(smollm2_path, max_total_tokens=4096, random_seed=0) as e:
        yield e


@pytest.fixture(scope="module")
def small_engine(smollm2_path: str) -> Iterator[Engine]:
    """Chunks of 16 tokens and a 128-slot pool: long prompts are split, batches get retracted."""
    with Engine(smollm2_path, max_total_tokens=128, chunked_prefill_size=16, random_seed=0) as e:
        yield e


@pytest.fixture(autouse=True)
def slots_have_one_owner(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("engine", "small_engine"):
        if name in request.fixturenames:
            request.getfixturevalue(name).check_invariant()


def prompts(engine: Engine) -> dict[str, str]:
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three primary colours."}]
    )
    return {
        "plain": "The capital of France is",
        "code": "def fibonacci(n):\n    ",
        "chat": chat,
        "story": "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    }


def greedy(max_new_tokens: int = NEW_TOKENS, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, **extra}


def assert_reference_greedy(
    hf: Any, engine: Engine, prompt_ids: list[int], out: dict[str, Any], max_new_tokens: int
) -> torch.Tensor:
    """Assert out is transformers' greedy continuation; returns transformers' logprob rows."""
    ids = out["output_ids"]
    assert ids, out
    lp = hf_logprobs(hf, prompt_ids + ids)
    rows = lp[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)]
    best = rows.argmax(-1).tolist()
    if best != ids:
        i = next(i for i, (a, b) in enumerate(zip(best, ids, strict=True)) if a != b)
        top2 = rows[i].topk(2).values
        pytest.fail(
            f"token {i}: engine {ids[i]} vs transformers {best[i]} "
            f"(reference margin {float(top2[0] - top2[1]):.2e}); engine {ids} reference {best}"
        )
    reason = out["meta_info"]["finish_reason"]
    eos = engine.tokenizer.eos_token_ids
    assert not any(t in eos for t in ids[:-1]), "generation ran past an eos"
    if ids[-1] in eos:
        assert reason == {"type": "stop", "matched": ids[-1]}
    else:
        assert reason == {"type": "length", "length": max_new_tokens}
        assert len(ids) == max_new_tokens
    assert out["meta_info"]["completion_tokens"] == len(ids)
    assert out["meta_info"]["prompt_tokens"] == len(prompt_ids)
    assert out["text"] == engine.tokenizer.decode(ids)
    return rows


def spy_forward(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> list[list[tuple[int, int]]]:
    """Record each forward's (start, new tokens) per sequence."""
    runner = engine.core.runner
    real = runner.forward
    calls: list[list[tuple[int, int]]] = []

    def forward(seqs: list[ScheduledSeq]) -> torch.Tensor:
        calls.append([(s.start, len(s.new_ids)) for s in seqs])
        return real(seqs)

    monkeypatch.setattr(runner, "forward", forward)
    return calls


def is_mixed(call: list[tuple[int, int]]) -> bool:
    """A forward holding both a multi-token prefill chunk and a single-token decode."""
    return any(n > 1 for _, n in call) and any(n == 1 and start > 0 for start, n in call)


@pytest.mark.parametrize("name", ["plain", "code", "chat"])
def test_greedy_equals_transformers(hf: Any, engine: Engine, name: str) -> None:
    text = prompts(engine)[name]
    out = engine.generate(text, greedy())
    assert_reference_greedy(hf, engine, engine.tokenizer.encode(text), out, NEW_TOKENS)


def test_mixed_batch_equals_transformers(
    hf: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch with different lengths and limits, a sampled neighbour, and prefills that run
    beside decodes (the second few-shot question waits one step for the shared prefix)."""
    assert engine.flush_cache()
    calls = spy_forward(monkeypatch, engine)
    texts = [
        *prompts(engine).values(),
        FEW_SHOT + "Q: What is frozen water called? A:",
        FEW_SHOT + "Q: What do bees make? A:",
        "Tell me a random word:",
    ]
    limits = [NEW_TOKENS, 8, NEW_TOKENS, 12, 6, 6, NEW_TOKENS]
    params = [greedy(n) for n in limits]
    params[-1] = {"max_new_tokens": NEW_TOKENS, "temperature": 0.9, "sampling_seed": 1}
    outs = engine.generate(texts, params)
    assert isinstance(outs, list) and len(outs) == len(texts)
    for text, n, out in list(zip(texts, limits, outs, strict=True))[:-1]:
        assert_reference_greedy(hf, engine, engine.tokenizer.encode(text), out, n)
    assert any(is_mixed(c) for c in calls), calls


def test_cache_hit_and_extension_equal_transformers(hf: Any, engine: Engine) -> None:
    assert engine.flush_cache()
    prompt_ids = engine.tokenizer.encode(prompts(engine)["story"])
    first = engine.generate(input_ids=prompt_ids, sampling_params=greedy())
    assert first["meta_info"]["cached_tokens"] == 0
    assert_reference_greedy(hf, engine, prompt_ids, first, NEW_TOKENS)

    again = engine.generate(input_ids=prompt_ids, sampling_params=greedy())
    # Everything but the last prompt token, whose logits are needed to sample, comes from the cache.
    assert again["meta_info"]["cached_tokens"] == len(prompt_ids) - 1
    assert again["output_ids"] == first["output_ids"]

    # The next turn: prompt + output were inserted when the first request finished (all but the
    # last output token, which was never fed to the model).
    longer = prompt_ids + first["output_ids"] + engine.tokenizer.encode(" Then the")
    ext = engine.generate(input_ids=longer, sampling_params=greedy())
    assert ext["meta_info"]["cached_tokens"] >= len(prompt_ids) + len(first["output_ids"]) - 1
    assert_reference_greedy(hf, engine, longer, ext, NEW_TOKENS)


def test_chunked_prefill_equals_transformers(
    hf: Any, small_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert small_engine.flush_cache()
    calls = spy_forward(monkeypatch, small_engine)
    # The short prompt first: it decodes while the long one's later chunks are prefilled.
    texts = ["The capital of France is", FEW_SHOT + "Q: What is the largest planet? A:"]
    ids = [small_engine.tokenizer.encode(t) for t in texts]
    assert len(ids[1]) > 3 * 16
    outs = small_engine.generate(texts, greedy(8), return_logprob=True, logprob_start_len=0)
    for prompt_ids, out in zip(ids, outs, strict=True):
        rows = assert_reference_greedy(hf, small_engine, prompt_ids, out, 8)
        # Prompt logprobs come from several chunks: each chunk's rows must line up.
        got = out["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in got] == prompt_ids and got[0][0] is None
        ref = hf_logprobs(hf, prompt_ids)[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None])
        torch.testing.assert_close(
            torch.tensor([v for v, _, _ in got[1:]]), ref[:, 0], atol=LOGPROB_ATOL, rtol=0
        )
        out_lp = torch.tensor([v for v, _, _ in out["meta_info"]["output_token_logprobs"]])
        ref_out = rows.gather(1, torch.tensor(out["output_ids"])[:, None])[:, 0]
        torch.testing.assert_close(out_lp, ref_out, atol=LOGPROB_ATOL, rtol=0)
    assert max(n for c in calls for _, n in c) <= 16
    assert sum(1 for c in calls if any(n > 1 for _, n in c)) >= 4  # the long prompt took chunks
    assert any(is_mixed(c) for c in calls), calls


def test_split_extend_attention_equals_transformers(
    hf: Any, smollm2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every extend after a cached prefix (the later chunks of a long prompt, longer than the
    short rows the compiled kernel takes) split from its prefix as the CPU does for long ones:
    greedy tokens and prompt logprobs as transformers'."""
    monkeypatch.setattr(layers, "_SPLIT_QUERIES", 1)
    monkeypatch.setattr(layers, "_SPLIT_KEYS", 1)
    with Engine(smollm2_path, max_total_tokens=512, chunked_prefill_size=70) as engine:
        calls = spy_forward(monkeypatch, engine)
        prompt_ids = engine.tokenizer.encode(FEW_SHOT * 4 + "Q: What is the largest planet? A:")
        longest_row = engine.core.runner.backend.max_row_queries
        out = engine.generate(
            input_ids=prompt_ids,
            sampling_params=greedy(),
            return_logprob=True,
            logprob_start_len=0,
        )
        assert sum(1 for c in calls if any(start > 0 and n > longest_row for start, n in c)) >= 2
        assert_reference_greedy(hf, engine, prompt_ids, out, NEW_TOKENS)
        engine.check_invariant()
    got = out["meta_info"]["input_token_logprobs"]
    ref = hf_logprobs(hf, prompt_ids)[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None])
    torch.testing.assert_close(
        torch.tensor([v for v, _, _ in got[1:]]), ref[:, 0], atol=LOGPROB_ATOL, rtol=0
    )


def test_retraction_keeps_greedy_output(hf: Any, small_engine: Engine) -> None:
    """Six requests need ~190 slots of a 128-slot pool: some are retracted, then resume."""
    assert small_engine.flush_cache()
    texts = [
        "The capital of France is",
        "My favourite food is",
        "The best way to learn a language is",
        "In the morning I like to",
        "The tallest mountain in the world is",
        "Water boils at a temperature of",
    ]
    before = small_engine.get_stats()["num_retractions"]
    outs = small_engine.generate(texts, greedy(24, ignore_eos=True))
    assert small_engine.get_stats()["num_retractions"] > before
    for text, out in zip(texts, outs, strict=True):
        assert_reference_greedy(hf, small_engine, small_engine.tokenizer.encode(text), out, 24)


def test_logprobs_close_to_transformers(hf: Any, engine: Engine) -> None:
    text = prompts(engine)["code"]
    prompt_ids = engine.tokenizer.encode(text)
    k = 5
    out = engine.generate(
        text, greedy(), return_logprob=True, logprob_start_len=0, top_logprobs_num=k
    )
    meta = out["meta_info"]
    ids = out["output_ids"]
    lp = hf_logprobs(hf, prompt_ids + ids)

    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids
    assert inputs[0][0] is None  # nothing predicts the first token
    ref_in = lp[: len(prompt_ids) - 1].gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
    got_in = torch.tensor([v for v, _, _ in inputs[1:]])
    torch.testing.assert_close(got_in, ref_in, atol=LOGPROB_ATOL, rtol=0)

    outputs = meta["output_token_logprobs"]
    assert [t for _, t, _ in outputs] == ids
    rows = lp[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)]
    ref_out = rows.gather(1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor([v for v, _, _ in outputs]), ref_out, atol=LOGPROB_ATOL, rtol=0
    )

    # Top logprobs: the reference's top-k ids, in order, with their values.
    tops = meta["output_top_logprobs"]
    assert len(tops) == len(ids) and all(len(t) == k for t in tops)
    ref_vals, ref_ids = rows.topk(k, dim=-1)
    for i, top in enumerate(tops):
        assert [t for _, t, _ in top] == ref_ids[i].tolist(), f"output position {i}"
        torch.testing.assert_close(
            torch.tensor([v for v, _, _ in top]), ref_vals[i], atol=LOGPROB_ATOL, rtol=0
        )
    in_tops = meta["input_top_logprobs"]
    assert len(in_tops) == len(prompt_ids) and in_tops[0] == []
    ref_vals, ref_ids = lp[: len(prompt_ids) - 1].topk(k, dim=-1)
    for i, top in enumerate(in_tops[1:]):
        assert [t for _, t, _ in top] == ref_ids[i].tolist(), f"prompt position {i + 1}"


def test_prompt_logprobs_from_a_start_on_a_cached_prompt(hf: Any, engine: Engine) -> None:
    """The cache may serve the prompt only up to the first position whose logits are owed."""
    text = prompts(engine)["story"]
    prompt_ids = engine.tokenizer.encode(text)
    engine.generate(text, greedy(1))  # now cached
    start = 7
    out = engine.generate(text, greedy(4), return_logprob=True, logprob_start_len=start)
    assert 0 < out["meta_info"]["cached_tokens"] <= start - 1
    inputs = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids[start:]
    lp = hf_logprobs(hf, prompt_ids)
    ref = lp[start - 1 : -1].gather(1, torch.tensor(prompt_ids[start:])[:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor([v for v, _, _ in inputs]), ref, atol=LOGPROB_ATOL, rtol=0
    )
