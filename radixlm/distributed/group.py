"""One rank's side of a tensor-parallel group: its process group (gloo on the CPU, NCCL on CUDA,
made directly over a TCP store on loopback, so no process-wide default group exists; small CPU
all-reduces through shared memory), the collectives a forward needs, and the model surgery that
makes a rank's model use them."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from radixlm.distributed.sharding import TensorSplit
from radixlm.distributed.shm import MAX_NUMEL, ShmAllReduce
from radixlm.models.llama import DecoderLayer, LlamaForCausalLM

# How long a collective (or the group's start) waits for a peer before it fails: a rank that
# hangs mid-step ends the step with an error instead of stalling the engine for ever.
COLLECTIVE_TIMEOUT_S = 300.0


def open_store(rank: int, size: int, port: int = 0) -> dist.TCPStore:
    """The store a group's ranks meet at, on loopback: rank 0 hosts it (`port` 0: any free
    port, `store.port` says which) without waiting; the others connect to its port."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    return dist.TCPStore(
        "127.0.0.1", port, size, rank == 0, timeout=timeout, wait_for_workers=False
    )


class TPGroup:
    """The collectives of one rank, over the `open_store` of its group."""

    def __init__(
        self,
        rank: int,
        size: int,
        store: dist.TCPStore,
        device: torch.device,
        shm_path: str | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """`shm_path`: a file from `create_shm_file` through which small CPU all-reduces go
        (mapped before the group meets, so rank 0 may remove it once this returns); `alive`
        says whether the other ranks still run."""
        self.rank, self.size, self.device = rank, size, device
        self.shm = None if shm_path is None else ShmAllReduce(shm_path, rank, size, alive)
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        self.pg: Any  # a c10d Backend; torch's stubs omit its collectives
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, size, timeout)
        self._store = store  # the store lives as long as the group

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum `t` over the ranks, in place."""
        if self.shm is not None and t.numel() <= MAX_NUMEL:
            self.shm(t)
        else:
            self.pg.allreduce([t]).wait()

    def gather_columns(self, t: torch.Tensor, width: int) -> torch.Tensor | None:
        """Rank 0: the ranks' [rows, cols] tensors side by side, cut to `width` columns; the
        other ranks send theirs and get None."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        t = t.contiguous()
        if self.rank != 0:
            self.pg.gather([], [t], opts).wait()
            return None
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.gather([parts], [t], opts).wait()
        return torch.cat(parts, dim=1)[:, :width]


class RowParallelLinear(nn.Linear):
    """A bias-free linear layer over this rank's input columns; the ranks' partial outputs are
    summed, so every rank gets the whole output."""

    def __init__(self, linear: nn.Linear, group: TPGroup) -> None:
        assert linear.bias is None, "a bias would be added once per rank"
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.group: TPGroup = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        self.group.all_reduce(out)
        return out


def parallelize(model: nn.Module, split: TensorSplit, group: TPGroup) -> None:
    """Turn a model built from `split.rank_config` and `split.shard(...)` into its rank's part:
    o_proj and down_proj sum over the ranks, the LM head keeps this rank's vocabulary rows
    (the caller gathers the logits), and decodes run layer by layer (the fused decode pass
    cannot stop between layers to all-reduce). Text models only (ValueError otherwise)."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"--tp > 1 supports text models only, not {type(model).__name__}")
    for layer in cast(list[DecoderLayer], list(model.layers)):
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    with torch.no_grad():
        model.lm_head.weight = nn.Parameter(split.lm_head_rows(model.lm_head.weight))
    model.fused_decode = False
