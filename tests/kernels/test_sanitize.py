"""scripts/sanitize.sh: the kernels built under AddressSanitizer load and run, and a read past
the KV pool (a slot one past its end, which `ModelRunner.forward` would refuse) stops the
process with the sanitizer's report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "sanitize.sh"
CXX = shutil.which("g++")
HAS_ASAN = (
    CXX is not None
    and Path(
        subprocess.run(
            [CXX, "-print-file-name=libasan.so"], capture_output=True, text=True
        ).stdout.strip()
    ).is_absolute()
)

# One short row (3 cached tokens + 1 new) over a pool of 64 slots whose last slot id is `bad`;
# built without the runner's slot check, straight into the kernel.
PROBE = """
import sys, torch
from radixlm.core.plan import ScheduledSeq
from radixlm.kernels.build import load_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.runner.runner import build_batch
lib = load_kernels()
assert lib is not None
backend = CpuKernelBackend(lib)
num_slots, kvh, h, d = 64, 2, 4, 64
k = torch.randn(kvh, num_slots + 1, d)
v = torch.randn_like(k)
seq = ScheduledSeq([1], 3, torch.tensor([1, 2, 3, int(sys.argv[1])]), 3)
rows = build_batch([seq], backend, torch.device("cpu")).rows
q = torch.randn(1, h, d)
out = torch.empty_like(q)
backend.row_attention(q, k, v, rows, d**-0.5, out)
print("attended", bool(torch.isfinite(out).all()))
"""


def _probe(slot: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), sys.executable, "-c", PROBE, str(slot)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ASAN, reason="no g++ with an AddressSanitizer runtime")
def test_the_sanitized_kernels_run_and_stop_at_a_read_past_the_pool() -> None:
    ok = _probe(64)  # the pool's last slot
    assert ok.returncode == 0 and "attended True" in ok.stdout, ok.stderr[-3000:]
    bad = _probe(65)  # one past it: the last KV head's read ends past its buffer
    assert bad.returncode != 0, bad.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "row_attention" in bad.stderr or "attend_row" in bad.stderr, bad.stderr[-3000:]
