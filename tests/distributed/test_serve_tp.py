"""`radixlm serve --tp 2`, alone and with `--dp 2`: the server answers with the tokens of one
rank, and its rank processes go when it stops."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from radixlm.engine.engine import Engine
from radixlm.server.child_process import ServerProcess

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BODY = {
    "text": ["The capital of France is", "One, two, three,"],
    "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
}


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            out += [child, *descendants(child)]
    return out


def rank_workers(pid: int) -> list[int]:
    """The tensor-parallel worker ranks among the processes below `pid`."""
    ranks = []
    for p in descendants(pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"radixlm.distributed.worker" in cmdline:
            ranks.append(p)
    return ranks


def gone(pid: int) -> bool:
    path = Path(f"/proc/{pid}/stat")
    return not path.exists() or path.read_text().split()[2] == "Z"


@pytest.fixture(scope="module")
def expected_ids(tiny_model_dir: Path) -> list[list[int]]:
    """BODY's greedy tokens from one rank in this process."""
    with Engine(str(tiny_model_dir), max_total_tokens=2000) as engine:
        outs = engine.generate(BODY["text"], BODY["sampling_params"])
    assert isinstance(outs, list)
    return [o["output_ids"] for o in outs]


def start(model: Path, log: Path, *flags: str) -> ServerProcess:
    args = [*flags, "--model-path", str(model), "--max-total-tokens", "2000"]
    return ServerProcess.start(args, log, ENV, 300.0, die_with_parent=True)


def generate(http: httpx.Client) -> list[list[int]]:
    out = http.post("/generate", json=BODY)
    assert out.status_code == 200, out.text
    return [o["output_ids"] for o in out.json()]


def test_serve_tp_2_survives_a_dead_rank(
    tiny_model_dir: Path, tmp_path: Path, expected_ids: list[list[int]]
) -> None:
    """A killed rank ends its engine with an error naming it; the server starts a new engine
    (with a new rank) and answers the request that was waiting."""
    server = start(tiny_model_dir, tmp_path / "tp.log", "--tp", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert http.get("/get_server_info").json()["tp_size"] == 2
            assert generate(http) == expected_ids
            (rank,) = rank_workers(server.proc.pid)
            os.kill(rank, signal.SIGKILL)
            assert generate(http) == expected_ids  # held across the engine's restart
            (new_rank,) = rank_workers(server.proc.pid)
            assert new_rank != rank
            assert http.get("/internal/check_invariant").json() == {"ok": True}
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert "tensor-parallel rank 1 exited with code -9" in server.log()
    assert gone(new_rank)


def test_serve_dp_2_tp_2(
    tiny_model_dir: Path, tmp_path: Path, expected_ids: list[list[int]]
) -> None:
    """Two engine servers of two ranks each behind the router."""
    server = start(tiny_model_dir, tmp_path / "dp.log", "--dp", "2", "--tp", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            info = http.get("/get_server_info").json()
            assert info["router"]["dp"] == 2 and info["router"]["tp_size"] == 2
            assert len(info["workers"]) == 2
            assert generate(http) == expected_ids
            ranks = rank_workers(server.proc.pid)
            assert len(ranks) == 2
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert all(gone(p) for p in ranks)
