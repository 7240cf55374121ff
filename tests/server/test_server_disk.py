"""The disk KV tier behind `radixlm serve`: SIGTERM writes it, a restarted server hits at once,
and a second server on the same directory is refused with a clear error."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from server_harness import ServerProcess, metric, parse_metrics


def generate(srv: ServerProcess, ids: list[int]) -> dict[str, Any]:
    params = {"max_new_tokens": 4, "temperature": 0}
    with srv.client() as client:
        r = client.post("/generate", json={"input_ids": ids, "sampling_params": params})
        r.raise_for_status()
        out: dict[str, Any] = r.json()
    return out


def test_sigterm_writes_the_tier_and_a_restarted_server_hits(
    start_tiny_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    ids = torch.randint(3, 49_000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    flags = ("--random-seed", "0", "--kv-cache-dir", str(tmp_path))
    first = start_tiny_server(*flags)
    before = generate(first, ids)
    assert before["meta_info"]["cached_tokens"] == 0
    assert first.stop() in (0, -signal.SIGTERM), first.log()
    again = start_tiny_server(*flags)
    try:
        with pytest.raises(RuntimeError, match="in use by another process"):
            start_tiny_server(*flags)
        after = generate(again, ids)
        assert after["output_ids"] == before["output_ids"]
        assert after["meta_info"]["cached_tokens"] == len(ids) - 1  # from disk
        with again.client() as client:
            samples = parse_metrics(client.get("/metrics").text)
        assert metric(samples, "radixlm:cache_hit_tokens_disk_total") == len(ids) - 1
    finally:
        assert again.stop() in (0, -signal.SIGTERM), again.log()


def test_a_flush_keeps_the_tier_and_the_storage_clear_deletes_it(
    start_tiny_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """/flush_cache empties the pool but not the disk tier (as SGLang's flush leaves its storage
    tier); /clear_hicache_storage_backend deletes the tier's blocks (SGLang's answer)."""
    ids = torch.randint(3, 49_000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    srv = start_tiny_server("--random-seed", "0", "--kv-cache-dir", str(tmp_path))
    try:
        first = generate(srv, ids)
        with srv.client() as client:
            # The selective policy writes a long prompt as the flush evicts it.
            assert client.post("/flush_cache").status_code == 200
            again = generate(srv, ids)
            assert again["meta_info"]["cached_tokens"] == len(ids) - 1  # from disk
            assert again["output_ids"] == first["output_ids"]
            assert client.post("/flush_cache").status_code == 200
            r = client.post("/hicache/storage-backend/clear")
            assert r.status_code == 200, r.text
            assert r.json() == "Hierarchical cache storage backend cleared."
            deadline = time.monotonic() + 10
            while list(tmp_path.rglob("*.kv")):
                assert time.monotonic() < deadline, "blocks left after the clear"
                time.sleep(0.05)
            cold = generate(srv, ids)
            assert cold["meta_info"]["cached_tokens"] == 0
            assert cold["output_ids"] == first["output_ids"]
            r = client.get("/clear_hicache_storage_backend")  # SGLang's older route
            assert (
                r.status_code == 200 and r.json() == "Hierarchical cache storage backend cleared."
            )
            assert generate(srv, ids)["meta_info"]["cached_tokens"] == len(ids) - 1  # the pool's
            assert client.get("/internal/check_invariant").status_code == 200
    finally:
        assert srv.stop() in (0, -signal.SIGTERM), srv.log()
