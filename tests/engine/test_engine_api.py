"""The Engine API on a tiny random model: stop conditions, streaming, sampling, cache, bad inputs.

The reference for generated tokens here is the same engine's plain greedy run (itself checked
against transformers in tests/models/test_llama.py): a feature that should only cut or extend a
run must reproduce that run exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from radixlm.engine.engine import Engine

CONTEXT = 256
POOL = 2048
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    with Engine(
        str(tiny_model_dir), max_total_tokens=POOL, context_length=CONTEXT, random_seed=0
    ) as e:
        yield e


@pytest.fixture(autouse=True)
def slots_have_one_owner(engine: Engine) -> Iterator[None]:
    yield
    engine.check_invariant()
    stats = engine.get_stats()
    assert stats["num_running_reqs"] == stats["num_queue_reqs"] == 0


def greedy(max_new_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, **extra}


def sampled(seed: int | None, max_new_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 1.0, "sampling_seed": seed, **extra}


def gen(engine: Engine, *args: Any, **kwargs: Any) -> dict[str, Any]:
    out = engine.generate(*args, **kwargs)
    assert isinstance(out, dict)
    return out


def gen_batch(engine: Engine, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    outs = engine.generate(*args, **kwargs)
    assert isinstance(outs, list)
    return outs


def test_batch_output_shape(engine: Engine) -> None:
    """SGLang's response dicts: one per prompt, in order, with the ids the text decodes from."""
    texts = [PROMPT, "Hello", "Numbers: 1, 2, 3,"]
    outs = gen_batch(engine, texts, greedy(8))
    for text, out in zip(texts, outs, strict=True):
        single = gen(engine, text, greedy(8))
        assert out["output_ids"] == single["output_ids"] and out["text"] == single["text"]
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == len(engine.tokenizer.encode(text))
        assert meta["completion_tokens"] == len(out["output_ids"]) == 8
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert out["text"] == engine.tokenizer.decode(out["output_ids"])
    assert len({o["meta_info"]["id"] for o in outs}) == len(outs)


def test_a_batch_given_one_rid_numbers_it_per_prompt(engine: Engine) -> None:
    """As n > 1 numbers its samples: two requests in flight never share a rid."""
    outs = gen_batch(engine, ["a", "b"], greedy(2, n=2), rid="batch")
    ids = ["batch-0-0", "batch-0-1", "batch-1-0", "batch-1-1"]
    assert [o["meta_info"]["id"] for o in outs] == ids
    one = gen_batch(engine, ["a"], greedy(2), rid="one")
    assert [o["meta_info"]["id"] for o in one] == ["one-0"]


# ---- cache and flush -----------------------------------------------------------------------


def test_flush_frees_every_slot(engine: Engine) -> None:
    gen_batch(engine, [PROMPT, PROMPT + " Again", "Other"], greedy(8))
    assert engine.get_stats()["cached_tree_tokens"] > 0
    assert engine.flush_cache()
    engine.check_invariant()
    stats = engine.get_stats()
    assert stats["num_used_tokens"] == 0 and stats["cached_tree_tokens"] == 0
    assert engine.core.allocator.num_free == POOL
    # And the engine serves as before from an empty cache.
    again = gen(engine, PROMPT, greedy(8))
    assert again["meta_info"]["cached_tokens"] == 0


def test_flush_is_refused_while_a_stream_runs(tiny_model_dir: Path) -> None:
    # Its own engine with the model's full context: ~2,000 tokens to go, so the request is still
    # running when the flush arrives however slowly this thread is scheduled.
    with Engine(str(tiny_model_dir), max_total_tokens=POOL) as e:
        stream = e.generate(PROMPT, greedy(2000, ignore_eos=True), stream=True)
        assert isinstance(stream, Iterator)
        first = next(stream)
        assert first["meta_info"]["finish_reason"] is None
        assert not e.flush_cache()
        e.check_invariant()  # mid-run: the request's private tail is counted once
        assert e.get_stats()["num_running_reqs"] == 1
        stream.close()  # aborts the request
        assert e.flush_cache()
        e.check_invariant()
        stats = e.get_stats()
        assert stats["num_used_tokens"] == 0 and stats["cached_tree_tokens"] == 0
        assert e.get_stats()["num_running_reqs"] == 0


def test_max_new_tokens_zero_caches_the_prompt(engine: Engine) -> None:
    assert engine.flush_cache()
    ids = engine.tokenizer.encode(PROMPT)
    out = gen(engine, PROMPT, {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert engine.get_stats()["cached_tree_tokens"] >= len(ids) - 1
    later = gen(engine, PROMPT, greedy(4))
    assert later["meta_info"]["cached_tokens"] == len(ids) - 1


def test_disable_radix_cache_gives_the_same_output_and_caches_nothing(
    engine: Engine, tiny_model_dir: Path
) -> None:
    texts = [PROMPT, PROMPT, PROMPT + " And then"]
    want = [gen(engine, t, greedy(12))["output_ids"] for t in texts]
    with Engine(str(tiny_model_dir), max_total_tokens=POOL, disable_radix_cache=True) as plain:
        for text, ids in zip(texts, want, strict=True):
            out = gen(plain, text, greedy(12))
            assert out["output_ids"] == ids
            assert out["meta_info"]["cached_tokens"] == 0
        outs = gen_batch(plain, texts, greedy(12))
        assert [o["output_ids"] for o in outs] == want
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
        assert plain.get_stats()["cached_tree_tokens"] == 0
        plain.check_invariant()
        assert plain.get_stats()["num_used_tokens"] == 0


# ---- stop conditions -----------------------------------------------------------------------


def test_stop_string_across_tokens_is_cut_and_never_leaks(engine: Engine) -> None:
    ref = gen(engine, PROMPT, greedy(24))
    ids, text = ref["output_ids"], ref["text"]
    # A stop string made of the end of token 5's text and the start of token 6's.
    end5 = len(engine.tokenizer.decode(ids[:6]))
    stop = text[end5 - 2 : end5 + 2]
    assert len(stop) == 4 and stop.strip(), text
    cut = text.find(stop)
    last = next(i for i in range(len(ids)) if stop in engine.tokenizer.decode(ids[: i + 1]))

    out = gen(engine, PROMPT, greedy(24, stop=[stop, "never appears \u2603"]))
    assert out["text"] == text[:cut] and stop not in out["text"]
    assert out["output_ids"] == ids[: last + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}

    chunks = list(engine.generate(PROMPT, greedy(24, stop=stop), stream=True))
    assert all(stop not in c["text"] for c in chunks)
    assert chunks[-1]["text"] == text[:cut]

    kept = gen(engine, PROMPT, greedy(24, stop=stop, no_stop_trim=True))
    assert kept["text"] == text[: cut + len(stop)]


def test_stop_token_ids(engine: Engine) -> None:
    ids = gen(engine, PROMPT, greedy(24))["output_ids"]
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = gen(engine, PROMPT, greedy(24, stop_token_ids=[stop_id]))
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}


def test_matched_stop_token_is_trimmed_from_the_text(engine: Engine) -> None:
    ids = gen(engine, PROMPT, greedy(24))["output_ids"]
    stop_id = ids[3]
    out = gen(engine, PROMPT, greedy(24, stop_token_ids=[stop_id]))
    assert out["output_ids"][-1] == stop_id  # the ids keep it, as in SGLang
    assert out["text"] == engine.tokenizer.decode(out["output_ids"][:-1])
    kept = gen(engine, PROMPT, greedy(24, stop_token_ids=[stop_id], no_stop_trim=True))
    assert kept["text"] == engine.tokenizer.decode(kept["output_ids"])


@pytest.fixture(scope="module")
def eos_engine(
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_model: Callable[..., Path],
) -> Iterator[tuple[Engine, list[int]]]:
    """The tiny model (same weights) with its eos set to the third token of PROMPT's greedy
    run, and that run."""
    with Engine(str(tiny_model_dir), max_total_tokens=POOL) as e:
        ids = gen(e, PROMPT, greedy(24))["output_ids"]
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-eos"), eos_token_id=ids[2])
    with Engine(str(folder), max_total_tokens=POOL) as e:
        yield e, ids
        e.check_invariant()


def test_eos_ignore_eos_and_min_new_tokens(eos_engine: tuple[Engine, list[int]]) -> None:
    e, ids = eos_engine
    eos = ids[2]
    assert eos in e.tokenizer.eos_token_ids
    first = ids.index(eos)

    out = gen(e, PROMPT, greedy(24))
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}

    out = gen(e, PROMPT, greedy(24, ignore_eos=True))
    assert out["output_ids"] == ids
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}

    # min_new_tokens masks eos for the first 6 tokens, so generation continues past it.
    out = gen(e, PROMPT, greedy(24, min_new_tokens=6))
    got = out["output_ids"]
    assert len(got) >= 6 and eos not in got[:6]
    assert got[:first] == ids[:first]
    if got[-1] == eos:
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    else:
        assert len(got) == 24


def test_generation_stops_at_the_context_length(engine: Engine) -> None:
    """The default max_new_tokens (128) is cut at the context; an explicit one that cannot fit
    is refused, as SGLang, vLLM and OpenAI refuse it."""
    prompt_ids = list(range(100, 100 + CONTEXT - 6))
    out = gen(engine, input_ids=prompt_ids, sampling_params={"temperature": 0, "ignore_eos": True})
    assert len(out["output_ids"]) == 6
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    with pytest.raises(ValueError, match=f"context length is {CONTEXT} tokens, but {CONTEXT + 14}"):
        engine.generate(input_ids=prompt_ids, sampling_params=greedy(20, ignore_eos=True))
    exact = gen(engine, input_ids=prompt_ids, sampling_params=greedy(6, ignore_eos=True))
    assert exact["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


# ---- streaming -----------------------------------------------------------------------------


def test_stream_chunks_are_cumulative_and_end_like_the_plain_call(engine: Engine) -> None:
    params = greedy(20)
    want = gen(engine, PROMPT, params)
    chunks = list(engine.generate(PROMPT, params, stream=True))
    assert len(chunks) > 1
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        assert prev["meta_info"]["finish_reason"] is None
    assert chunks[-1]["text"] == want["text"]
    assert chunks[-1]["output_ids"] == want["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]


def test_batch_stream_tags_chunks_with_their_index(engine: Engine) -> None:
    texts = [PROMPT, "Hello there"]
    want = [o["output_ids"] for o in gen_batch(engine, texts, greedy(10))]
    last: dict[int, dict[str, Any]] = {}
    for chunk in engine.generate(texts, greedy(10), stream=True):
        i = chunk["index"]
        if i in last:
            assert chunk["output_ids"][: len(last[i]["output_ids"])] == last[i]["output_ids"]
        last[i] = chunk
    assert [last[i]["output_ids"] for i in range(2)] == want


# ---- asyncio -------------------------------------------------------------------------------


def test_async_generate_equals_generate(engine: Engine) -> None:
    texts = [PROMPT, "Hello there", "One two three"]
    want = gen_batch(engine, texts, greedy(12))

    async def main() -> tuple[Any, Any, list[Any]]:
        one = await engine.async_generate(PROMPT, greedy(12))
        batch = await engine.async_generate(texts, greedy(12))
        # Concurrent calls from one event loop share the engine's batches.
        each = await asyncio.gather(*(engine.async_generate(t, greedy(12)) for t in texts))
        return one, batch, each

    one, batch, each = asyncio.run(main())
    assert isinstance(one, dict) and isinstance(batch, list)
    assert one["output_ids"] == want[0]["output_ids"] and one["text"] == want[0]["text"]
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for o in want]
    assert [o["text"] for o in each] == [o["text"] for o in want]
    assert [o["meta_info"]["finish_reason"] for o in each] == [
        o["meta_info"]["finish_reason"] for o in want
    ]


def test_async_stream_is_cumulative_and_ends_like_the_plain_call(engine: Engine) -> None:
    texts = [PROMPT, "Hello there"]
    want = gen_batch(engine, texts, greedy(10))

    async def main() -> tuple[list[Any], dict[int, Any]]:
        single = [c async for c in await engine.async_generate(PROMPT, greedy(10), stream=True)]
        last: dict[int, Any] = {}
        async for chunk in await engine.async_generate(texts, greedy(10), stream=True):
            i = chunk["index"]
            if i in last:
                assert chunk["output_ids"][: len(last[i]["output_ids"])] == last[i]["output_ids"]
            last[i] = chunk
        return single, last

    single, last = asyncio.run(main())
    assert len(single) > 1
    for prev, cur in zip(single, single[1:], strict=False):
        assert cur["text"].startswith(prev["text"])
        assert prev["meta_info"]["finish_reason"] is None
    assert single[-1]["output_ids"] == want[0]["output_ids"]
    assert [last[i]["output_ids"] for i in range(2)] == [o["output_ids"] for o in want]


def test_leaving_an_async_stream_early_aborts_its_request(engine: Engine) -> None:
    before = engine.get_stats()["num_forward_passes"]

    async def main() -> int:
        stream = await engine.async_generate(PROMPT, greedy(200, ignore_eos=True), stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
        # The engine finishes the abort on its own thread; wait for it without blocking.
        for _ in range(500):
            if engine.get_stats()["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == 2
    assert engine.get_stats()["num_forward_passes"] - before < 100  # not the 200 asked for
    assert gen(engine, PROMPT, greedy(4))["meta_info"]["finish_reason"]["type"] == "length"


def test_async_bad_input_raises_and_the_engine_keeps_serving(engine: Engine) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="max_new_tokens"):
            await engine.async_generate(PROMPT, {"max_new_tokens": -1})

    asyncio.run(main())
    assert gen(engine, PROMPT, greedy(4))["meta_info"]["finish_reason"]["type"] == "length"


# ---- sampling ------------------------------------------------------------------------------


def test_sampling_seed_is_reproducible_across_batch_compositions(engine: Engine) -> None:
    alone = gen(engine, PROMPT, sampled(7))["output_ids"]
    assert gen(engine, PROMPT, sampled(7))["output_ids"] == alone
    batch = gen_batch(
        engine,
        ["Hello", PROMPT, PROMPT, "Another prompt entirely"],
        [sampled(None), sampled(7), sampled(8), greedy(5)],
    )
    assert batch[1]["output_ids"] == alone
    assert batch[2]["output_ids"] != alone  # the tiny model's distribution is nearly flat
    # Joining a running batch part-way (streamed request already decoding) changes nothing.
    stream = engine.generate("Hello", sampled(None, max_new_tokens=40), stream=True)
    assert isinstance(stream, Iterator)
    next(stream)
    assert gen(engine, PROMPT, sampled(7))["output_ids"] == alone
    stream.close()


def test_unseeded_sampling_differs_between_requests(engine: Engine) -> None:
    outs = gen_batch(engine, [PROMPT] * 3, sampled(None))
    assert len({tuple(o["output_ids"]) for o in outs}) == 3


def test_n_samples_share_the_prompt_kv(engine: Engine) -> None:
    assert engine.flush_cache()
    text = " ".join([PROMPT] * 5)
    n_prompt = len(engine.tokenizer.encode(text))
    assert n_prompt > 40  # longer than the run of tokens that marks two prefills as the same
    outs = gen_batch(engine, text, sampled(11, n=3))
    assert len(outs) == 3
    # The first sample prefills; the others find everything but the last prompt token cached.
    assert sorted(o["meta_info"]["cached_tokens"] for o in outs) == [0, n_prompt - 1, n_prompt - 1]
    assert len({tuple(o["output_ids"]) for o in outs}) == 3
    assert len({o["meta_info"]["id"] for o in outs}) == 3
    # Seeded samples are reproducible one by one: sample j uses sampling_seed + j.
    for j, out in enumerate(outs):
        assert gen(engine, text, sampled(11 + j))["output_ids"] == out["output_ids"]


def test_text_is_the_decoded_output_ids(engine: Engine) -> None:
    """Random tokens include pieces of multi-byte characters; mid-text they decode to U+FFFD."""
    outs = gen_batch(engine, [PROMPT] * 8, [sampled(s, max_new_tokens=16) for s in range(8)])
    for out in outs:
        assert out["text"] == engine.tokenizer.decode(out["output_ids"])


def test_final_text_keeps_a_trailing_partial_character(engine: Engine) -> None:
    """At the end the detokenizer must flush what it held back (SGLang emits U+FFFD)."""
    tok = engine.tokenizer
    runs = gen_batch(engine, [PROMPT] * 16, [sampled(s, max_new_tokens=48) for s in range(16)])
    # A seeded run whose token k leaves a character unfinished; stop exactly there.
    seed, k = next(
        (s, k)
        for s, run in enumerate(runs)
        for k in range(len(run["output_ids"]))
        if tok.decode(run["output_ids"][: k + 1]).endswith("\ufffd")
    )
    ids = runs[seed]["output_ids"][: k + 1]
    out = gen(engine, PROMPT, sampled(seed, max_new_tokens=k + 1))
    assert out["output_ids"] == ids
    assert out["text"] == tok.decode(ids)
    chunks = list(engine.generate(PROMPT, sampled(seed, max_new_tokens=k + 1), stream=True))
    assert chunks[-1]["text"] == tok.decode(ids)


# ---- bad inputs ----------------------------------------------------------------------------

BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "prompt is empty"),
    ({"input_ids": []}, "prompt is empty"),
    ({"prompt": []}, "batch is empty"),
    ({"input_ids": [1, 49152]}, "49152, outside the vocabulary"),
    ({"input_ids": [[1, 2], [-1]]}, "-1, outside the vocabulary"),
    ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be >= 0"),
    ({"sampling_params": {"top_p": 0}}, r"top_p must be in \(0, 1\]"),
    ({"sampling_params": {"max_tokens": 4}}, "unknown sampling parameter 'max_tokens'"),
    ({"prompt": "word " * (CONTEXT + 10)}, "context length"),
    ({"input_ids": list(range(3, CONTEXT + 3))}, "context length"),
    ({"prompt": 123}, "text must be a string"),
    ({"prompt": ["ok", 5]}, "text must be a string"),
    ({"input_ids": [1, "2"]}, "input_ids must be a list of integers"),
    ({"sampling_params": "greedy"}, "sampling_params must be an object"),
    ({"sampling_params": {"max_new_tokens": "8"}}, "max_new_tokens must be an integer"),
    ({"sampling_params": {"temperature": None}}, "temperature must be a number"),
    ({"sampling_params": {"stop": 5}}, "stop must be a string or a list of strings"),
    ({"sampling_params": {"stop_token_ids": [49152]}}, "stop_token_ids must be in"),
    ({"prompt": ["a", "b"], "sampling_params": [{}]}, "sampling_params has 1 entries"),
    ({"prompt": "x", "input_ids": [1]}, "exactly one of text and input_ids"),
    ({"return_logprob": True, "top_logprobs_num": -2}, "top_logprobs_num must be an integer"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_and_the_engine_keeps_serving(
    engine: Engine, kwargs: dict[str, Any], message: str
) -> None:
    args = {"prompt": PROMPT, "sampling_params": greedy(4)}
    if "input_ids" in kwargs and "prompt" not in kwargs:
        del args["prompt"]
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        engine.generate(**args)
    out = gen(engine, PROMPT, greedy(4))
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


def test_a_batch_with_one_bad_prompt_submits_nothing(engine: Engine) -> None:
    before = engine.get_stats()["num_forward_passes"]
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate(input_ids=[[5, 6, 7], []], sampling_params=greedy(4))
    assert engine.get_stats()["num_forward_passes"] == before


def test_a_prompt_larger_than_the_pool_is_refused(tiny_model_dir: Path) -> None:
    """Within the context but beyond the KV pool: a ValueError naming the pool (a 400 over HTTP),
    before anything of the batch is queued; the engine keeps serving."""
    with Engine(str(tiny_model_dir), max_total_tokens=64) as small:
        long_ids = list(range(100, 180))
        with pytest.raises(ValueError, match="KV cache holds only 64"):
            small.generate(input_ids=[long_ids, [5, 6, 7]], sampling_params=greedy(4))
        assert small.get_stats()["num_forward_passes"] == 0
        small.check_invariant()
        out = gen(small, input_ids=[5, 6, 7], sampling_params=greedy(4))
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
