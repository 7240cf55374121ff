"""Tensor parallelism on the CPU (gloo), two ranks against one: the logits of the same forwards,
the greedy tokens of the same mixed batch, the slot invariant, and a rank that dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from radixlm.core.plan import ScheduledSeq
from radixlm.distributed.runner import TensorParallelRunner
from radixlm.engine.client import EngineDeadError
from radixlm.engine.engine import Engine
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

SLOTS = 512


def steps() -> list[list[ScheduledSeq]]:
    """Forwards over one pool: a first chunk alone, two prefills (one a second chunk), then a
    mixed batch: an extend after a cached prefix, a third chunk, two decodes and a short row of
    three tokens."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 49152, (120,), generator=gen)
    b = torch.randint(0, 49152, (60,), generator=gen)
    a_slots, b_slots = torch.arange(1, 121), torch.arange(121, 181)
    c_slots = torch.cat([a_slots[:40], torch.arange(181, 221)])  # shares a's first 40 slots
    c = torch.cat([a[:40], torch.randint(0, 49152, (40,), generator=gen)])

    def seq(ids: torch.Tensor, slots: torch.Tensor, start: int, end: int, logits: int) -> Any:
        return ScheduledSeq(ids[start:end].tolist(), start, slots[:end], end - logits)

    return [
        [seq(b, b_slots, 0, 10, 0)],  # a first chunk: no logits to gather
        [seq(a, a_slots, 0, 100, 100), seq(b, b_slots, 10, 30, 1)],
        [
            seq(c, c_slots, 40, 80, 40),  # extend on a cached prefix
            seq(b, b_slots, 30, 57, 27),  # the third chunk
            seq(a, a_slots, 100, 101, 1),  # decodes
            seq(b, b_slots, 57, 58, 1),
            seq(a, a_slots, 101, 104, 3),  # a short row of three
        ],
    ]


def test_two_ranks_give_the_logits_of_one(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Qwen2 (q/k/v biases) with a tied LM head and one KV head for two ranks (replicated); the
    plain Llama split (two KV heads) runs in the engine test below."""
    path = make_tiny_model(
        tmp_path / "model", "qwen2", tie_word_embeddings=True, num_key_value_heads=1
    )
    config, weights = load_model_files(str(path))
    cpu, f32 = torch.device("cpu"), torch.float32
    one = ModelRunner(config, weights, cpu, f32, SLOTS)
    two = TensorParallelRunner(str(path), config, weights, cpu, f32, SLOTS, f32, tp_size=2)
    try:
        assert two.pool.num_kv_heads == 1 and two.pool.num_slots == SLOTS
        for batch in steps():
            expected, got = one.forward(batch), two.forward(batch)
            assert got.shape == expected.shape == (sum(s.num_logits for s in batch), 49152)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    finally:
        workers = list(two.workers)
        two.close()
    assert [w.proc.poll() for w in workers] == [0]  # the worker rank stopped when asked


PREFIX = "You are a helpful assistant. Answer briefly and in full sentences. " * 3
QUESTIONS = ["What is a radix tree?", "Why cache prefixes?", "Name a prime.", "Hello!"]


def run_batch(engine: Engine) -> list[dict[str, Any]]:
    """Prompts sharing a prefix, of several lengths and budgets, at once; then again (cached)."""
    prompts = [PREFIX + q for q in QUESTIONS] + ["A short one."]
    params = [
        {"max_new_tokens": 6 + 3 * i, "temperature": 0, "ignore_eos": True}
        for i in range(len(prompts))
    ]
    outs: list[dict[str, Any]] = []
    for _ in range(2):
        out = engine.generate(prompts, params, return_logprob=True)
        assert isinstance(out, list)
        outs += out
        engine.check_invariant()
    return outs


def test_two_ranks_decode_the_tokens_of_one(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Greedy output over a mixed batch with prefix sharing and chunked prefill (chunks of 32
    tokens) is the same with two ranks; the slot invariant holds after every batch. The model
    splits unevenly, as SmolLM2-135M does: 3 KV heads (1 + 2) and 99 MLP columns (49 + 50)."""
    model = make_tiny_model(
        tmp_path / "model",
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=99,
    )
    args = {"max_total_tokens": 2000, "chunked_prefill_size": 32, "random_seed": 0}
    with Engine(str(model), **args) as engine:
        expected = run_batch(engine)
    with Engine(str(model), tp_size=2, **args) as engine:
        runner = engine.core.runner
        assert isinstance(runner, TensorParallelRunner)
        workers = list(runner.workers)
        got = run_batch(engine)
        assert engine.get_server_info()["tp_size"] == 2
        stats = engine.get_stats()
        assert stats["cached_tree_tokens"] > len(PREFIX) // 8  # the prefix was shared
    assert [w.proc.poll() for w in workers] == [0]  # shutdown stopped the worker rank
    for e, g in zip(expected, got, strict=True):
        assert g["output_ids"] == e["output_ids"]
        assert g["meta_info"]["cached_tokens"] == e["meta_info"]["cached_tokens"]
        lp_e = [t[0] for t in e["meta_info"]["output_token_logprobs"]]
        lp_g = [t[0] for t in g["meta_info"]["output_token_logprobs"]]
        assert lp_g == pytest.approx(lp_e, abs=1e-4)
    assert any(g["meta_info"]["cached_tokens"] > 0 for g in got)


def test_a_dead_rank_ends_the_engine_with_a_clear_error(tiny_model_dir: Path) -> None:
    engine = Engine(str(tiny_model_dir), tp_size=2, max_total_tokens=1000)
    try:
        runner = engine.core.runner
        assert isinstance(runner, TensorParallelRunner)
        (worker,) = runner.workers
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        with pytest.raises(EngineDeadError, match="tensor-parallel rank 1 exited with code -9"):
            engine.generate("Hello", {"max_new_tokens": 2})
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_smollm2_greedy_text_is_the_same_on_two_ranks(smollm2_path: str) -> None:
    """The real model, split unevenly (9 heads over 3 KV heads: 1 + 2 KV heads per rank)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    params = {"max_new_tokens": 24, "temperature": 0}
    outputs = []
    for tp in (1, 2):
        with Engine(smollm2_path, tp_size=tp, max_total_tokens=4000) as engine:
            outs = engine.generate(prompts, params)
            assert isinstance(outs, list)
            outputs.append([o["output_ids"] for o in outs])
            engine.check_invariant()
    assert outputs[0] == outputs[1]
