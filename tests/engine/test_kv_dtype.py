"""A bfloat16 KV cache under a float32 model: same greedy tokens on a short run, close logprobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radixlm.engine.engine import Engine

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time",
    "A prompt longer than a short row: it is one chunk that attends over its own fresh keys "
    "and values, never over the ones it wrote to the pool. " * 4,
]


def _run(model: Path, kv: str) -> list[dict[str, Any]]:
    with Engine(str(model), max_total_tokens=2048, kv_cache_dtype=kv) as engine:
        assert engine.core.runner.backend.max_row_queries <= 64
        params = {"max_new_tokens": 8, "temperature": 0}
        outs = engine.generate(PROMPTS, params, return_logprob=True, logprob_start_len=0)
        engine.check_invariant()
        assert engine.get_stats()["num_used_tokens"] == 0
    assert isinstance(outs, list)
    return outs


def test_bfloat16_kv_cache_tracks_the_float32_one(tiny_model_dir: Path) -> None:
    ref, low = _run(tiny_model_dir, "auto"), _run(tiny_model_dir, "bfloat16")
    for a, b in zip(ref, low, strict=True):
        lp_a = [e[0] for e in a["meta_info"]["output_token_logprobs"]]
        lp_b = [e[0] for e in b["meta_info"]["output_token_logprobs"]]
        n = next(
            (
                i
                for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"], strict=False))
                if x != y
            ),
            8,
        )
        # bfloat16 keeps 8 mantissa bits: K/V are off by ~0.4%, logprobs by well under 0.05.
        for x, y in zip(lp_a[:n], lp_b[:n], strict=True):
            assert abs(x - y) < 0.05
        # Prompt logprobs: a first chunk past a short row attends over its own fresh K/V, so
        # they are exact; a short prompt is a row, which reads its K/V back from the pool.
        ia = [e[0] for e in a["meta_info"]["input_token_logprobs"][1:]]
        ib = [e[0] for e in b["meta_info"]["input_token_logprobs"][1:]]
        exact = a["meta_info"]["prompt_tokens"] > 64  # any backend's longest short row
        assert max(abs(x - y) for x, y in zip(ia, ib, strict=True)) < (1e-5 if exact else 0.05)
    assert any(a["meta_info"]["prompt_tokens"] > 64 for a in ref)
