"""`radixlm serve --dp 2`: two engine servers and the router on one port."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from radixlm.server.child_process import ServerProcess


def test_serve_dp_2(router_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--dp", "2", "--model-path", str(router_model), "--max-total-tokens", "3000"]
    server = ServerProcess.start(args, tmp_path / "dp.log", env, 300.0)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            info = http.get("/get_server_info").json()
            assert info["router"]["dp"] == 2 and len(info["workers"]) == 2
            worker_pids = [
                int(p)
                for p in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
                .read_text()
                .split()
            ]
            body = {
                "text": ["a b c", "d e f"],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            }
            out = http.post("/generate", json=body)
            assert out.status_code == 200 and len(out.json()) == 2
            assert http.post("/flush_cache").status_code == 200
            assert http.post("/abort_request", json={"abort_all": True}).json() == {"aborted": 0}
            assert 'sglang:num_requests_total{worker="' in http.get("/metrics").text
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log()
    for pid in worker_pids:  # the engine servers went with it
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
