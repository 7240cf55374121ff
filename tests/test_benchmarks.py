"""Every benchmark command still runs end to end and prints its figures (at tiny sizes: the
figures themselves are measured on a quiet machine, see docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RATIO = r"[0-9]+\.[0-9]+"

CASES = [
    pytest.param(
        "bench_engine.py",
        "all --questions 2 --prefix-len 40 --question-len 8 --rounds 1 --prompts 2 --prompt-len 16"
        " --output-len 2 --batch 1 --prefill-len 32 --repeat 1 --decode-batch 2"
        " --decode-context 16 --decode-steps 2 --pass-batches 2 --max-total-tokens 4096",
        [
            rf"throughput cache on / off = {RATIO}x",
            rf"throughput cache on / off = {RATIO}  ",
            rf"forward / matmuls = {RATIO}",
            rf"step / matmuls = {RATIO}",
            rf"time outside the forward = {RATIO}% of a step",
            rf"decode pass: batch 2 x 16: .* layers / pass = {RATIO}",
            rf"decode pass next to a busy process: .* layers / pass = {RATIO}",
            rf"cached / uncached = {RATIO}",
            rf"native +{RATIO} ms",
            rf"plain read \(torch.sum\) +{RATIO} ms",
        ],
        id="engine",
    ),
    pytest.param(
        "bench_grammar.py",
        "all --prompts 2 --sequential 1 --concurrency 1,2 --max-new-tokens 32 --batch 2"
        " --repeat 2 --rounds 1 --tight-tokens 16",
        [
            rf"concurrency  2: [0-9]+% fewer forward passes .* throughput on / off = {RATIO}x",
            r"identical greedy texts with and without jump-forward: 2/2",
            rf"jump-forward on .*\n .*: {RATIO}% of the step",
            r"closing on : 2/2 parse",
            rf"throughput cost of closing, time on / off = {RATIO}",
            rf"grammar work per request .* on {RATIO} ms, off {RATIO} ms",
        ],
        id="grammar",
    ),
    pytest.param(
        "bench_lang.py",
        "--tot-programs 1 --context-words 20 --fewshot-batch 2 --shots 2 --overhead-reps 2",
        [rf"speedup {RATIO}x", r"us per gen", rf"overhead -?{RATIO} ms per call"],
        id="lang",
    ),
    pytest.param(
        "bench_serving.py",
        "--compare-engine --rounds 1 --gsp-num-groups 2 --gsp-prompts-per-group 2"
        " --gsp-system-prompt-len 40 --gsp-question-len 8 --gsp-output-len 2",
        [r"Successful requests: +4", rf"Served / in-process throughput \(best\): +{RATIO}"],
        id="serving",
    ),
    pytest.param(
        "bench_serving.py",
        "--ttft-cached --gsp-num-groups 2 --gsp-prompts-per-group 2 --gsp-system-prompt-len 40"
        " --gsp-question-len 8",
        [rf"TTFT p50 cached / uncached: +{RATIO}"],
        id="serving-ttft",
    ),
    pytest.param(
        "bench_speculative.py",
        "--rounds 1 --max-new-tokens 6 --batches 1 --large-batch 2 --row-reps 1"
        " --max-total-tokens 2048",
        [
            rf"decode step, 1 row: {RATIO} ms",
            rf"4x4 {RATIO}",
            rf"\(a\) batch  1: .* on / off = {RATIO}x",
            rf"\(b\) batch  1: .* on / off = {RATIO}x .* radix: [0-9]+/[0-9]+ accepted, "
            rf"accept length {RATIO}",
            rf"\(d\) batch  2: .* on / off = {RATIO}x",
        ],
        id="speculative",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "figures"), CASES)
def test_benchmark_runs(script: str, args: str, figures: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args.split()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for figure in figures:
        assert re.search(figure, run.stdout), f"{figure!r} not in:\n{run.stdout}"
