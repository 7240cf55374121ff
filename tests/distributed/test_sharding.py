"""How a model is cut over tensor-parallel ranks: the shards put back together are the model,
each rank's query heads read its KV heads, and splits that do not divide are refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from radixlm.distributed.sharding import TensorSplit
from radixlm.models.config import ModelConfig


def config(**overrides: Any) -> ModelConfig:
    base = ModelConfig(
        architecture="qwen2",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=12,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        attention_bias=True,
    )
    return dataclasses.replace(base, **overrides)


def weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.q_proj.bias": (q,),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}


# Where each weight's rank shards are joined: rows (0), columns (1), or replicated (None).
JOIN = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0}
JOIN |= {"o_proj": 1, "down_proj": 1}


@pytest.mark.parametrize(
    ("overrides", "size", "rank_shapes"),
    [
        ({}, 2, [(2, 1, 6), (2, 1, 6)]),
        # SmolLM2-135M's heads (9 over 3 KV heads) and an odd MLP: dealt 1 + 2 KV heads.
        ({"num_heads": 9, "num_kv_heads": 3, "intermediate_size": 15}, 2, [(3, 1, 7), (6, 2, 8)]),
    ],
    ids=["even", "uneven"],
)
def test_shards_put_back_together_are_the_model(
    overrides: dict[str, Any], size: int, rank_shapes: list[tuple[int, int, int]]
) -> None:
    cfg = config(**overrides)
    full = weights(cfg)
    splits = [TensorSplit(cfg, size, r) for r in range(size)]
    shards = [s.shard(full) for s in splits]
    for name, tensor in full.items():
        dim = JOIN.get(name.split(".")[-2])
        parts = [s[name] for s in shards]
        if dim is None:
            assert all(p is tensor for p in parts), name
        else:
            assert torch.equal(torch.cat(parts, dim), tensor), name
    shapes = [
        (c.num_heads, c.num_kv_heads, c.intermediate_size) for c in (s.rank_config for s in splits)
    ]
    assert shapes == rank_shapes
    group = cfg.num_heads // cfg.num_kv_heads
    for s in splits:  # each rank's query heads read its own KV heads
        assert {h // group for h in s.q_heads} == set(s.kv_heads)


def test_kv_heads_fewer_than_ranks_are_replicated_where_their_queries_are() -> None:
    cfg = config(num_heads=8, num_kv_heads=2, intermediate_size=16)
    group = cfg.num_heads // cfg.num_kv_heads  # query heads per KV head
    full = weights(cfg)
    for r in range(4):
        split = TensorSplit(cfg, 4, r)
        (kv_head,) = split.kv_heads
        assert {h // group for h in split.q_heads} == {kv_head}
        d = cfg.head_dim
        k = split.shard(full)["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(k, full["model.layers.0.self_attn.k_proj.weight"][kv_head * d :][:d])
    assert [TensorSplit(cfg, 4, r).kv_heads.start for r in range(4)] == [0, 0, 1, 1]


def test_lm_head_rows_are_padded_on_the_last_rank() -> None:
    cfg = config()  # a vocabulary of 10 over 4 ranks: 3 rows each, the last with 1
    head = weights(cfg)["lm_head.weight"]
    parts = [TensorSplit(cfg, 4, r).lm_head_rows(head) for r in range(4)]
    assert all(p.shape == (3, cfg.hidden_size) for p in parts)
    assert torch.equal(torch.cat(parts)[:10], head)
    assert not parts[3][1:].any()


@pytest.mark.parametrize(
    ("overrides", "size", "error"),
    [
        ({}, 3, "tp_size 3 cannot split the model's 4 attention heads over 2 KV heads"),
        ({"num_heads": 8}, 6, "tp_size 6 cannot split .* each KV head's 4 query heads"),
        ({"intermediate_size": 2}, 4, "tp_size 4 exceeds the MLP size 2"),
        ({}, 0, "tp_size must be >= 1"),
    ],
)
def test_splits_that_do_not_divide_are_refused(
    overrides: dict[str, Any], size: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        TensorSplit(config(**overrides), size)
