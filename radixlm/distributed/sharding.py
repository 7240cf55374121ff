"""How a model is cut over the ranks of a tensor-parallel group (the Megatron split): attention
heads (q/k/v rows, o_proj columns), MLP columns (gate/up rows, down_proj columns) and LM head
rows (vocabulary); everything else is replicated. No torch.distributed here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from radixlm.models.config import ModelConfig


@dataclass(frozen=True)
class TensorSplit:
    """Rank `rank`'s share of `config` over `size` ranks.

    Rules: the attention heads and the MLP's intermediate size must divide evenly by `size`;
    KV heads either divide evenly, or (fewer KV heads than ranks, as in SGLang) `size` is a
    multiple of them and each KV head is replicated on the ranks whose query heads read it.
    The vocabulary is cut in rows of ceil(vocab / size); the last rank's are zero-padded.
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
        if cfg.num_heads % n:
            raise ValueError(
                f"tp_size {n} does not divide the model's {cfg.num_heads} attention heads"
            )
        if cfg.intermediate_size % n:
            raise ValueError(
                f"tp_size {n} does not divide the model's MLP size {cfg.intermediate_size}"
            )
        kv = cfg.num_kv_heads
        if kv % n and n % kv:
            raise ValueError(
                f"tp_size {n} and the model's {kv} KV heads: one must be a multiple of the other"
            )

    @property
    def rank_config(self) -> ModelConfig:
        """The shape of this rank's model: its heads and MLP columns (the vocabulary is whole:
        the embedding is replicated and the LM head cut after loading)."""
        cfg = self.config
        return dataclasses.replace(
            cfg,
            num_heads=cfg.num_heads // self.size,
            num_kv_heads=len(self.kv_heads),
            intermediate_size=cfg.intermediate_size // self.size,
        )

    @property
    def q_heads(self) -> range:
        """This rank's query heads."""
        per = self.config.num_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        """This rank's KV heads: the ones its query heads read (one, replicated, when the model
        has fewer KV heads than ranks)."""
        kv, n = self.config.num_kv_heads, self.size
        if kv >= n:
            per = kv // n
            return range(self.rank * per, (self.rank + 1) * per)
        first = self.rank * kv // n
        return range(first, first + 1)

    @property
    def vocab_rows(self) -> int:
        """LM head rows per rank (the last rank's padded with zeros)."""
        return -(-self.config.vocab_size // self.size)

    def shard(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's weights under the checkpoint's names (views where possible)."""
        d = self.config.head_dim
        per_inter = self.config.intermediate_size // self.size
        q, kv = self.q_heads, self.kv_heads
        rows = {
            "q_proj": (q.start * d, len(q) * d),
            "k_proj": (kv.start * d, len(kv) * d),
            "v_proj": (kv.start * d, len(kv) * d),
            "gate_proj": (self.rank * per_inter, per_inter),
            "up_proj": (self.rank * per_inter, per_inter),
        }
        cols = {
            "o_proj": (q.start * d, len(q) * d),
            "down_proj": (self.rank * per_inter, per_inter),
        }
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
