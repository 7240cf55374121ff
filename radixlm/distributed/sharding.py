"""How a model is cut over the ranks of a tensor-parallel group (the Megatron split): attention
heads (q/k/v rows, o_proj columns), MLP columns (gate/up rows, down_proj columns) and LM head
rows (vocabulary); everything else is replicated. No torch.distributed here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from radixlm.models.config import ModelConfig


def _block(n: int, size: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of n items dealt over `size` ranks as evenly as can be."""
    return range(n * rank // size, n * (rank + 1) // size)


@dataclass(frozen=True)
class TensorSplit:
    """Rank `rank`'s share of `config` over `size` ranks.

    Rules: with at least as many KV heads as ranks, each rank takes a contiguous block of KV
    heads, as even as can be (SmolLM2-135M's 3 over 2 ranks: 1 and 2; rank 0, which also
    schedules, gets the smaller share), and the query heads that read them. With fewer KV heads than ranks (as in SGLang), `size` must be a multiple of
    them: each KV head is replicated on `size / kv` ranks, which split its query heads evenly.
    MLP columns are dealt like KV heads; the vocabulary is cut in rows of ceil(vocab / size)
    (the last rank's zero-padded). Everything else is replicated.
    """

    config: ModelConfig
    size: int
    rank: int = 0

    def __post_init__(self) -> None:
        cfg, n = self.config, self.size
        if n < 1:
            raise ValueError(f"tp_size must be >= 1, got {n}")
        if not 0 <= self.rank < n:
            raise ValueError(f"rank {self.rank} is not in a group of {n}")
        kv, group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        if kv < n and (n % kv or group % (n // kv)):
            raise ValueError(
                f"tp_size {n} cannot split the model's {cfg.num_heads} attention heads over "
                f"{kv} KV heads: above the KV heads, tp_size must be a multiple of them that "
                f"divides each KV head's {group} query heads"
            )
        if cfg.intermediate_size < n:
            raise ValueError(f"tp_size {n} exceeds the MLP size {cfg.intermediate_size}")

    @property
    def rank_config(self) -> ModelConfig:
        """The shape of this rank's model: its heads and MLP columns (the vocabulary is whole:
        the embedding is replicated and the LM head cut after loading)."""
        return dataclasses.replace(
            self.config,
            num_heads=len(self.q_heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=len(self.mlp_columns),
        )

    @property
    def kv_heads(self) -> range:
        """This rank's KV heads."""
        kv, n = self.config.num_kv_heads, self.size
        if kv >= n:
            return _block(kv, n, self.rank)
        first = self.rank * kv // n
        return range(first, first + 1)

    @property
    def q_heads(self) -> range:
        """This rank's query heads: the ones that read its KV heads (a share of them, where a
        KV head is replicated)."""
        kv, n = self.config.num_kv_heads, self.size
        group = self.config.num_heads // kv
        heads = self.kv_heads
        if kv >= n:
            return range(heads.start * group, heads.stop * group)
        replicas = n // kv
        per = group // replicas
        start = heads.start * group + (self.rank % replicas) * per
        return range(start, start + per)

    @property
    def mlp_columns(self) -> range:
        """This rank's columns of the MLP's intermediate size."""
        return _block(self.config.intermediate_size, self.size, self.rank)

    @property
    def vocab_rows(self) -> int:
        """LM head rows per rank (the last rank's padded with zeros)."""
        return -(-self.config.vocab_size // self.size)

    def shard(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's weights under the checkpoint's names (views where possible)."""
        d = self.config.head_dim
        q, kv, mlp = self.q_heads, self.kv_heads, self.mlp_columns
        rows = {
            "q_proj": (q.start * d, len(q) * d),
            "k_proj": (kv.start * d, len(kv) * d),
            "v_proj": (kv.start * d, len(kv) * d),
            "gate_proj": (mlp.start, len(mlp)),
            "up_proj": (mlp.start, len(mlp)),
        }
        cols = {"o_proj": (q.start * d, len(q) * d), "down_proj": (mlp.start, len(mlp))}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in weights.items():
            pieces = name.split(".")
            module = pieces[-2] if len(pieces) >= 2 else ""
            if module in rows:
                out[name] = tensor.narrow(0, *rows[module])
            elif module in cols and pieces[-1] == "weight":
                out[name] = tensor.narrow(1, *cols[module])
            else:
                out[name] = tensor
        return out

    def lm_head_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the LM head [vocab, hidden], zero-padded to `vocab_rows`."""
        per = self.vocab_rows
        part = weight[self.rank * per : (self.rank + 1) * per]
        if part.shape[0] == per:
            return part.clone()
        padded = torch.zeros(per, weight.shape[1], dtype=weight.dtype, device=weight.device)
        padded[: part.shape[0]] = part
        return padded
