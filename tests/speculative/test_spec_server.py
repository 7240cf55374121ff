"""Speculative decoding behind the HTTP server: the flags reach the engine, and its counters
reach /metrics and /server_info."""

from __future__ import annotations

from pathlib import Path

import httpx

from radixlm.server.child_process import ServerProcess


def test_served_counters(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess.start(
        [
            "--model-path",
            str(tiny_model_dir),
            "--max-total-tokens",
            "2048",
            "--speculative-algorithm",
            "radix",
            "--speculative-num-draft-tokens",
            "3",
        ],
        tmp_path / "serve.log",
        die_with_parent=True,
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {
                "input_ids": [5, 900, 77, 1234, 42],
                "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
            }
            first = http.post("/generate", json=body).json()
            again = http.post("/generate", json=body).json()  # drafts from the first's tree
            assert again["output_ids"] == first["output_ids"]
            state = http.get("/server_info").json()["internal_states"][0]
            radix = state["spec"]["radix"]
            assert radix["accepted"] > 0 and radix["drafted"] >= radix["accepted"]
            assert 1.0 < state["avg_spec_accept_length"] <= 4.0
            metrics = http.get("/metrics").text
            assert 'sglang:spec_accepted_tokens_total{model_name="' in metrics
            assert 'algorithm="radix"} ' + str(radix["accepted"]) in metrics
            assert "sglang:spec_accept_length{" in metrics
    finally:
        server.stop()
