"""A tensor-parallel rank other than 0, as a process rank 0 starts
(`python -m radixlm.distributed.worker FD`, FD its end of a socket pair): it loads its shard,
joins the group, then runs each step's sequences rank 0 sends until rank 0 says stop or is gone."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection

import torch

from radixlm.distributed.group import TPGroup, open_store, parallelize
from radixlm.distributed.rank import RankSpec, rank_device, rank_forward
from radixlm.distributed.sharding import TensorSplit
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

logger = logging.getLogger(__name__)


def serve_rank(conn: Connection) -> int:
    """Build this rank from the spec rank 0 sends, then follow rank 0; the exit status."""
    spec: RankSpec = conn.recv()
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s rank{spec.rank} %(message)s"
    )
    torch.set_num_threads(spec.threads)
    device = rank_device(torch.device(spec.device), spec.rank)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        config, weights = load_model_files(spec.model_path)
        split = TensorSplit(config, spec.size, spec.rank)
        # This rank's shard of the model, and its heads' part of the KV pool (all the slots).
        runner = ModelRunner(
            split.rank_config,
            split.shard(weights),
            device,
            spec.dtype,
            spec.num_slots,
            spec.kv_dtype,
        )
        del weights
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return 1
    conn.send(("loaded", None))
    parent = os.getppid()  # rank 0; a new parent means it is gone
    store = open_store(spec.rank, spec.size, spec.port)
    group = TPGroup(
        spec.rank, spec.size, store, device, spec.shm_path, lambda: os.getppid() == parent
    )
    parallelize(runner.model, split, group)
    with torch.inference_mode():
        while True:
            try:
                seqs = pickle.loads(conn.recv_bytes())
            except EOFError:  # rank 0 is gone
                return 0
            if seqs is None:
                return 0
            rank_forward(runner.forward, group, seqs, config.vocab_size)


def main() -> None:
    """Entry point: the socket's file descriptor is the one argument."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0's process owns shutdown
    sys.exit(serve_rank(Connection(int(sys.argv[1]))))


if __name__ == "__main__":
    main()
