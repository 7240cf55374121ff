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


def test_shards_put_back_together_are_the_model() -> None:
    cfg, size = config(), 2
    full = weights(cfg)
    shards = [TensorSplit(cfg, size, r).shard(full) for r in range(size)]
    for name, tensor in full.items():
        module = name.split(".")[-2]
        dim = JOIN.get(module)
        parts = [s[name] for s in shards]
        if dim is None:
            assert all(p is tensor for p in parts), name
        else:
            assert torch.equal(torch.cat(parts, dim), tensor), name
    rank = TensorSplit(cfg, size, 1).rank_config
    assert (rank.num_heads, rank.num_kv_heads, rank.intermediate_size) == (2, 1, 6)
    assert shards[1]["model.layers.0.self_attn.q_proj.weight"].shape == (2 * 2, 8)


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
        ({}, 3, "does not divide the model's 4 attention heads"),
        ({"intermediate_size": 10}, 4, "does not divide the model's MLP size 10"),
        (
            {"num_heads": 12, "num_kv_heads": 4, "intermediate_size": 24},
            3,
            "tp_size 3 and the model's 4 KV heads",
        ),
        ({}, 0, "tp_size must be >= 1"),
    ],
)
def test_splits_that_do_not_divide_are_refused(
    overrides: dict[str, Any], size: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        TensorSplit(config(**overrides), size)
