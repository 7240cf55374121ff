"""Rank 0 of a tensor-parallel group, as the engine's runner: it starts the other ranks as worker
processes, sends them each step's sequences (the scheduler runs here only), runs its own share
and gathers the logits. A rank that dies or fails makes the forward raise `RankFailed`."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import torch

from radixlm.cache import KVPool
from radixlm.core.plan import ScheduledSeq
from radixlm.distributed.group import TPGroup, open_store, parallelize
from radixlm.distributed.rank import RankSpec, rank_device, rank_forward
from radixlm.distributed.sharding import TensorSplit
from radixlm.distributed.shm import create_shm_file, shm_supported
from radixlm.models.config import ModelConfig
from radixlm.runner.runner import ModelRunner, available_memory, pool_slots

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0


class RankFailed(RuntimeError):
    """A tensor-parallel rank died or failed: the group cannot go on."""


class RankProcess:
    """A worker rank's process and rank 0's end of the socket pair to it."""

    def __init__(self, spec: RankSpec) -> None:
        self.rank = spec.rank
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radixlm.distributed.worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(spec)

    def wait_loaded(self, timeout_s: float) -> None:
        """Return once the rank has loaded its shard; RankFailed if it failed or died."""
        if not self.conn.poll(timeout_s):
            raise RankFailed(f"tensor-parallel rank {self.rank} did not load in {timeout_s:.0f}s")
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            code = self.proc.wait()
            raise RankFailed(f"tensor-parallel rank {self.rank} exited with code {code}") from None
        if kind == "error":
            raise RankFailed(f"tensor-parallel rank {self.rank} failed to load: {detail}")

    def stop(self) -> None:
        """Ask the rank to exit; kill it if it does not in time."""
        with contextlib.suppress(OSError):
            self.conn.send_bytes(pickle.dumps(None))
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class TensorParallelRunner(ModelRunner):
    """The runner of rank 0 of `tp_size` ranks: its own shard is this ModelRunner (its heads'
    part of a pool of `num_slots` slots, like every rank's); each forward is sent to the other
    ranks first. Each rank runs this process's torch threads divided by `tp_size`; the thread
    count is restored on close."""

    def __init__(
        self,
        model_path: str,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        kv_dtype: torch.dtype,
        tp_size: int,
    ) -> None:
        split = TensorSplit(config, tp_size, 0)
        self.vocab_size = config.vocab_size
        self._threads_before = torch.get_num_threads()
        threads = max(1, self._threads_before // tp_size)
        store = open_store(0, tp_size)
        self.workers: list[RankProcess] = []
        use_shm = device.type == "cpu" and shm_supported()
        self._shm_path = create_shm_file(tp_size) if use_shm else None
        try:
            for r in range(1, tp_size):
                spec = RankSpec(
                    model_path, r, tp_size, store.port, str(device), dtype, kv_dtype, num_slots,
                    threads, logging.getLogger().getEffectiveLevel(), self._shm_path,
                )  # fmt: skip
                self.workers.append(RankProcess(spec))
            torch.set_num_threads(threads)
            super().__init__(
                split.rank_config, split.shard(weights), rank_device(device, 0), dtype,
                num_slots, kv_dtype,
            )  # fmt: skip
            for w in self.workers:
                w.wait_loaded(LOAD_TIMEOUT_S)
            self.group = TPGroup(0, tp_size, store, self.device, self._shm_path, self._alive)
            self._remove_shm_file()  # every rank has it mapped
            parallelize(self.model, split, self.group)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks, %d thread(s) each", tp_size, threads)

    def forward(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """The whole logits of a forward that every rank runs its share of."""
        payload = pickle.dumps(seqs, protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.workers:
            try:
                w.conn.send_bytes(payload)
            except OSError as e:
                raise self._failure(e) from e
        try:
            logits = rank_forward(super().forward, self.group, seqs, self.vocab_size)
        except RuntimeError as e:  # a collective whose peer is gone
            raise self._failure(e) from e
        assert logits is not None
        return logits

    def _failure(self, error: Exception) -> RankFailed:
        """Name the rank that exited, if one did within a second; else the collective's error."""
        deadline = time.monotonic() + 1.0
        while True:
            for w in self.workers:
                code = w.proc.poll()
                if code is not None:
                    return RankFailed(f"tensor-parallel rank {w.rank} exited with code {code}")
            if time.monotonic() > deadline:
                return RankFailed(f"tensor-parallel step failed: {error}")
            time.sleep(0.05)

    def _alive(self) -> bool:
        return all(w.proc.poll() is None for w in self.workers)

    def _remove_shm_file(self) -> None:
        if self._shm_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._shm_path)
            self._shm_path = None

    def close(self) -> None:
        """Stop the worker ranks and give the process its threads back."""
        for w in self.workers:
            w.stop()
        self.workers = []
        self._remove_shm_file()
        torch.set_num_threads(self._threads_before)


def tp_pool_slots(
    config: ModelConfig,
    tp_size: int,
    device: torch.device,
    kv_dtype: torch.dtype,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    mem_fraction: float | None,
) -> int:
    """KV slots of every rank's pool (the same number on each), sized per rank: on GPUs each
    rank has its own memory, so the largest rank (in weights, in KV heads) must fit in it; on
    the CPU the ranks share one memory, so their weights and pools add up."""
    splits = [TensorSplit(config, tp_size, r) for r in range(tp_size)]
    heads = [len(s.kv_heads) for s in splits]
    rank_bytes = [
        sum(t.numel() for t in s.shard(weights).values()) * dtype.itemsize for s in splits
    ]
    shared = device.type == "cpu"
    per_slot = KVPool.bytes_per_slot(
        config.num_layers, sum(heads) if shared else max(heads), config.head_dim, kv_dtype
    )
    weight_bytes = sum(rank_bytes) if shared else max(rank_bytes)
    return pool_slots(per_slot, weight_bytes, available_memory(device), device.type, mem_fraction)
