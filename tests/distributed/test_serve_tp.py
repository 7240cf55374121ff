"""`radixlm serve --tp 2`, alone and with `--dp 2`: the server answers with the tokens of one
rank, and its rank processes go when it stops."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

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


def expected_ids(model: Path) -> list[list[int]]:
    with Engine(str(model), max_total_tokens=2000) as engine:
        outs = engine.generate(BODY["text"], BODY["sampling_params"])
    assert isinstance(outs, list)
    return [o["output_ids"] for o in outs]


def serve(model: Path, log: Path, *flags: str) -> tuple[ServerProcess, list[list[int]], dict]:
    args = [*flags, "--model-path", str(model), "--max-total-tokens", "2000"]
    server = ServerProcess.start(args, log, ENV, 300.0)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            out = http.post("/generate", json=BODY)
            assert out.status_code == 200, out.text
            info = http.get("/get_server_info").json()
    except BaseException:
        server.stop()
        raise
    return server, [o["output_ids"] for o in out.json()], info


def test_serve_tp_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    server, got, info = serve(tiny_model_dir, tmp_path / "tp.log", "--tp", "2")
    ranks = rank_workers(server.proc.pid)
    assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert info["tp_size"] == 2 and len(ranks) == 1
    assert got == expected_ids(tiny_model_dir)
    assert all(gone(p) for p in ranks)


def test_serve_dp_2_tp_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two engine servers of two ranks each behind the router."""
    server, got, info = serve(tiny_model_dir, tmp_path / "dp.log", "--dp", "2", "--tp", "2")
    ranks = rank_workers(server.proc.pid)
    assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert info["router"]["dp"] == 2 and info["router"]["tp_size"] == 2
    assert len(info["workers"]) == 2 and len(ranks) == 2
    assert got == expected_ids(tiny_model_dir)
    assert all(gone(p) for p in ranks)
