"""Every benchmark command still runs end to end and prints its figures (at tiny sizes: the
figures themselves are measured on a quiet machine, see docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from radixlm.kernels.build import load_kernels
from radixlm.server.child_process import ServerProcess

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RATIO = r"[0-9]+\.[0-9]+"

CASES = [
    pytest.param(
        "bench_engine.py",
        "all --questions 2 --prefix-len 40 --question-len 8 --rounds 1 --prompts 2 --prompt-len 16"
        " --output-len 2 --batch 1 --prefill-len 32 --prefill-prefix 16 --repeat 1 --decode-batch 2"
        " --decode-context 16 --decode-steps 2 --pass-batches 2 --max-total-tokens 4096"
        " --gemm-rows 70,1 --mixed-chunks 24 --mixed-batches 2 --bursts 1 --burst-size 2"
        " --burst-prompt-len 32 --burst-output-len 2 --burst-decoders 2 --burst-decode-len 4"
        " --burst-interval 0.2 --extend-shapes 300x2000 --extend-group 2 --row-prompts 20"
        " --row-prefix 8",
        [
            rf"throughput cache on / off = {RATIO}x",
            rf"throughput cache on / off = {RATIO}  ",
            rf"throughput salted / unsalted = {RATIO}",
            rf"throughput public\+salt / unsalted = {RATIO}",
            rf"match_prefix per call: .*\(salted / unsalted = {RATIO}\)",
            rf"M = +70: GFLOP/s .*\*.*; chosen / F.linear = {RATIO}",
            rf"M = +1: GFLOP/s .*\*.*; chosen / F.linear = {RATIO}",
            rf"FMA peak +{RATIO} GFLOP/s \(registers only\); of it: mkl [0-9]+%, stream [0-9]+%",
            rf"forward / matmuls = {RATIO}",
            rf"matmuls vs F.linear = {RATIO}x throughput",
            rf"forward with torch's fused attention .* ms: torch's / this = {RATIO}",
            rf"1 x 32 new tokens after 16 cached each: .* masked / this = {RATIO} \(logits differ",
            rf"step / matmuls = {RATIO}",
            rf"time outside the forward = {RATIO}% of a step",
            rf"step / one read of the weights' bytes = {RATIO} as one tensor .* {RATIO} tensor by",
            rf"decode pass: batch 2 x 16: .* layers / pass = {RATIO}",
            rf"decode pass next to a busy process: .* layers / pass = {RATIO}",
            rf"cached / uncached = {RATIO}",
            rf"2 rows of 1 queries x 16 keys, torch.float32: .*\n +native +{RATIO} ms",
            rf"plain read \(torch.sum\) +{RATIO} ms",
            rf"bfloat16 vs F.linear = {RATIO}x throughput",
            rf"forward: bfloat16 .* bfloat16 / float32 = {RATIO}x throughput",
            rf"bf16 decode: batch 2 x 16: .* float32 / bfloat16 = {RATIO}",
            rf"chunk +24 \+ +2 decodes: one forward .*\n +one / two forwards = {RATIO}",
            rf" 20 new tokens after 8 cached \+ +2 decodes: as a row .* extend / row = {RATIO}",
            rf"adaptive / fixed: TTFT p50 {RATIO}, p99 {RATIO}; ITL p50 {RATIO}, p99 {RATIO}",
            rf"in forward passes {RATIO} s \({RATIO}%\)",
            r"prompt tokens computed [0-9]+ \(the fewest a prefix cache can: [0-9]+\)",
            rf"  +300 queries x  2000 prefix keys: .* split / this = {RATIO}, masked / this = "
            rf"{RATIO} \(max error",
        ],
        ["radix_shared_prefix", "radix_no_sharing", "decode_step_vs_batch"],
        id="engine",
    ),
    pytest.param(
        "bench_bf16_quality.py",
        "--limit 2",
        [
            rf"prose +[0-9]+ +{RATIO}% +{RATIO} +{RATIO} +{RATIO} +{RATIO}",
            rf"all +[0-9]+ +{RATIO}%",
            rf"bfloat16 speedup {RATIO}x",
        ],
        [],
        id="bf16-quality",
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
        ["jump_forward"],
        id="grammar",
    ),
    pytest.param(
        "bench_lang.py",
        "--tot-programs 1 --context-words 20 --fewshot-batch 2 --shots 2 --overhead-reps 2",
        [rf"speedup {RATIO}x", r"us per gen", rf"overhead -?{RATIO} ms per call"],
        [],
        id="lang",
    ),
    pytest.param(
        "bench_serving.py",
        "--compare-engine --rounds 1 --gsp-num-groups 2 --gsp-prompts-per-group 2"
        " --gsp-system-prompt-len 40 --gsp-question-len 8 --gsp-output-len 2",
        [r"Successful requests: +4", rf"Served / in-process throughput \(best\): +{RATIO}"],
        [],
        id="serving",
    ),
    pytest.param(
        "bench_serving.py",
        "--ttft-cached --gsp-num-groups 2 --gsp-prompts-per-group 2 --gsp-system-prompt-len 40"
        " --gsp-question-len 8",
        [rf"TTFT p50 cached / uncached: +{RATIO}"],
        [],
        id="serving-ttft",
    ),
    pytest.param(
        "bench_router.py",
        "cache --groups 2 --prefix-len 40 --questions 2 --question-len 4 --output-len 2"
        " --pool 300 --layers 1",
        [
            r"cache_aware +hit rate .* requests per worker",
            r"single engine +hit rate .* requests per worker 4 ",
            rf"round 1: cache_aware / round_robin: hit rate {RATIO}x, throughput {RATIO}x",
            rf"round 1: TTFT p99 cache_aware {RATIO} s, round_robin {RATIO} s, single {RATIO} s",
        ],
        [],
        id="router-cache",
    ),
    pytest.param(
        "bench_router.py",
        "overhead --requests 5 --seconds 0.5 --concurrency 4 --clients 1 --rounds 1",
        [
            rf"added -?{RATIO} ms",
            r"throughput via router [0-9]+ req/s",
            r"router CPU time per request [0-9]+ us .*: [0-9]+ req/s per core",
        ],
        [],
        id="router-overhead",
    ),
    pytest.param(
        "bench_images.py",
        "--images 2 --questions 2 --image-size 56 --vision-hidden 64 --vision-layers 2"
        " --lm-hidden 64 --lm-layers 2 --output-len 2 --rounds 1 --max-total-tokens 2048",
        [
            rf"throughput radix on / off \(both caches off\) = {RATIO}x",
            rf"encoder cache alone: {RATIO}x; its share of the gain = -?{RATIO}%",
        ],
        [],
        id="images",
    ),
    pytest.param(
        "bench_tp.py",
        "--prefill-len 16 --decode-batch 2 --decode-context 16 --steps 2 --repeat 1",
        [rf"prefill 16 tokens: .* tp=2 / tp=1 = {RATIO}", rf"tp=2 / tp=1 layer by layer = {RATIO}"],
        [],
        id="tp",
    ),
    pytest.param(
        "bench_speculative.py",
        "--rounds 1 --max-new-tokens 6 --batches 1 --large-batch 2 --row-reps 1"
        " --max-total-tokens 4096",
        [
            rf"step cost measured at start, ms by rows: 1: {RATIO}, 2: {RATIO}",
            rf"decode step, 1 row: {RATIO} ms",
            rf"4x4 {RATIO}",
            rf"\(a\) batch  1: .* on / off = {RATIO}x",
            rf"\(b\) batch  1: .* on / off = {RATIO}x .* radix: [0-9]+/[0-9]+ accepted, "
            rf"accept length {RATIO}",
            rf"\(d\) batch  2: .* on / off = {RATIO}x",
            rf"decode steps off [0-9]+, on [0-9]+; step cost model: on / off {RATIO}x, "
            rf"without the rejected draft rows {RATIO}x",
        ],
        [],
        id="speculative",
    ),
    pytest.param(
        "bench_disk.py",
        "all --prefix-len 260 --reps 1 --num-prompts 2 --prompt-len 260 --pool 300 --rounds 2"
        " --batch 1 --decode-batch 2 --decode-steps 2",
        [
            rf"disk / uncached = {RATIO}",
            rf"throughput with / without the tier = {RATIO}x",
            r"disk tier: .* hit rate [0-9.]+%",
            rf"on / off = {RATIO}",
        ],
        [],
        id="disk",
    ),
]


def run_benchmark(script: str, args: list[str]) -> str:
    """The command's stdout, after checking that it succeeded."""
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def assert_pngs(folder: Path, names: list[str]) -> None:
    """Exactly these figures were written, each a PNG of a real size."""
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(names)
    for name in names:
        data = (folder / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "figures", "pngs"), CASES)
def test_benchmark_runs(
    script: str, args: str, figures: list[str], pngs: list[str], tmp_path: Path
) -> None:
    plot = ["--plot", str(tmp_path)] if pngs else []
    out = run_benchmark(script, args.split() + plot)
    for figure in figures:
        assert re.search(figure, out), f"{figure!r} not in:\n{out}"
    assert_pngs(tmp_path, pngs)


def test_decode_pass_against_another_build() -> None:
    """`decode-pass --kernel-lib` runs another kernels build's pass in the same engine (here
    the 128-bit build, which other CPUs take) and prints its time against this build's."""
    other = load_kernels(("-mno-avx512f", "-mno-avx2"))
    if other is None:
        pytest.skip("no compiler for the kernels here")
    out = run_benchmark(
        "bench_engine.py",
        "decode-pass --pass-batches 2 --decode-context 16 --decode-steps 2 --no-pass-neighbour"
        f" --kernel-lib {other._name}".split(),
    )
    assert re.search(rf"decode pass: batch 2 x 16: .* layers / pass = {RATIO}", out), out
    assert re.search(rf"{re.escape(other._name)}: pass .* that build / this = {RATIO}", out), out


@pytest.mark.slow
def test_serving_against_a_peer(tmp_path: Path) -> None:
    """The peer mode runs every dataset against radixlm and an OpenAI-compatible peer (here a
    second radixlm server), prints one ratio row per dataset and draws them; the prefill
    dataset also prints each side's single-request prefill speed."""
    with ServerProcess.start([], die_with_parent=True) as peer:
        out = run_benchmark(
            "bench_serving.py",
            f"--peer-url {peer.url} --rounds 1 --gsp-num-groups 2 --gsp-prompts-per-group 2"
            " --gsp-system-prompt-len 40 --gsp-question-len 8 --gsp-output-len 2 --num-prompts 2"
            " --random-input-len 16 --random-output-len 2 --mt-conversations 2 --mt-turns 2"
            " --mt-question-len 8 --mt-output-len 2 --prefill-prompts 2 --prefill-len 24"
            " --datasets generated-shared-prefix,random,multiturn,prefill"
            f" --plot {tmp_path}".split(),
        )
    assert re.search(
        rf"single-request prefill, 24 tokens \(TTFT p50\): radixlm [0-9]+ tok/s, peer [0-9]+ "
        rf"tok/s, ratio {RATIO}x",
        out,
    ), out
    assert "prefill: 2 prompts x 24 tokens, one at a time" in out, out
    # The peer's cache is not flushed between datasets: their prompts must not overlap (the
    # prefill prompts would start with the random ones, drawn from the same seed).
    hits = re.search(r" prefill: peer .*\n(?:.*\n)*?Cache hit rate.*: +([0-9.]+)%", out)
    assert hits is not None and float(hits.group(1)) < 10, out
    datasets = (("generated-shared-prefix", 4), ("random", 2), ("multiturn", 4), ("prefill", 2))
    for dataset, requests in datasets:
        assert re.search(rf"{dataset} +{RATIO}x +[0-9]+ / [0-9]+ +[0-9]+ / [0-9]+", out), out
        # both servers' summary blocks, each with every request of the dataset served
        blocks = re.findall(rf" {dataset}: .*\n(?:.*\n)*?Successful requests: +([0-9]+)", out)
        assert blocks == [str(requests)] * 2, out
    assert_pngs(tmp_path, ["serving_vs_peer"])
