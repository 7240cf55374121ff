"""Tensor parallelism on the CPU: forward step times of one rank against two, measured in turn
in one run, on the same model and the same sequences.

tp=1 runs with all the threads (`--threads`, default 2) and the fused CPU decode pass; tp=2 runs
two ranks of `threads / 2` threads each (gloo all-reduces after o_proj and down_proj, layer by
layer); tp=1 layer by layer is the third column, which tells the split's cost from the pass's.

python benchmarks/bench_tp.py                    # SmolLM2-135M, prefill 512, decode 8 x 512
python benchmarks/bench_tp.py --model-path DIR   # another model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch

from radixlm.core.plan import ScheduledSeq
from radixlm.distributed.runner import TensorParallelRunner
from radixlm.models.default import default_model_path
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner
from radixlm.utils import progress

Step = Callable[[], object]


def timed(configs: list[tuple[int, Step]], repeat: int, desc: str) -> list[float]:
    """Median seconds of each (threads, step), run in turn `repeat` times after one untimed
    turn, each with its thread count set first."""
    times: list[list[float]] = [[] for _ in configs]
    with progress((repeat + 1) * len(configs), desc, "run") as bar:
        for turn in range(repeat + 1):
            for (threads, step), ts in zip(configs, times, strict=True):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                step()
                if turn:
                    ts.append(time.perf_counter() - t0)
                bar.update()
    return [statistics.median(ts) for ts in times]


def main() -> None:
    """Parse the arguments, build the three runners, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--threads", type=int, default=2, help="threads of tp=1; tp=2 halves them")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timed run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    path = args.model_path or default_model_path()
    config, weights = load_model_files(path)
    cpu, f32 = torch.device("cpu"), torch.float32
    b, ctx = args.decode_batch, args.decode_context
    slots = b * (ctx + 1) + args.prefill_len + 1
    torch.set_num_threads(args.threads)
    one = ModelRunner(config, weights, cpu, f32, slots)
    layered = ModelRunner(config, weights, cpu, f32, slots)
    layered.model.fused_decode = False
    two = TensorParallelRunner(path, config, weights, cpu, f32, slots, f32, tp_size=2)
    del weights
    half = max(1, args.threads // 2)
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1000, 40000, (n,), generator=gen).tolist()

    # The decode batch's contexts, prefilled once on each runner; then steps of one new token
    # per row, at position ctx (rewritten each step).
    rows = [torch.arange(1 + i * (ctx + 1), 1 + (i + 1) * (ctx + 1)) for i in range(b)]
    contexts = [ScheduledSeq(ids(ctx), 0, r[:ctx], ctx - 1) for r in rows]
    decodes = [ScheduledSeq(ids(1), ctx, r, ctx) for r in rows]
    prefill_slots = torch.arange(b * (ctx + 1) + 1, b * (ctx + 1) + 1 + args.prefill_len)
    prefill = [ScheduledSeq(ids(args.prefill_len), 0, prefill_slots, args.prefill_len - 1)]
    runners = ((one, args.threads), (layered, args.threads), (two, half))
    with progress(len(runners) * len(contexts), "decode contexts", "seq") as bar:
        for runner, threads in runners:
            torch.set_num_threads(threads)
            for seq in contexts:
                runner.forward([seq])
                bar.update()

    def decode(runner: ModelRunner) -> Step:
        def run() -> None:
            for _ in range(args.steps):
                runner.forward(decodes)

        return run

    pre = timed(
        [
            (args.threads, lambda: one.forward(prefill)),
            (half, lambda: two.forward(prefill)),
        ],
        args.repeat,
        "prefill tp=1 / tp=2",
    )
    dec = timed(
        [(args.threads, decode(one)), (args.threads, decode(layered)), (half, decode(two))],
        args.repeat,
        "decode tp=1 / tp=1 layered / tp=2",
    )
    dec = [t / args.steps for t in dec]
    two.close()
    print(f"model {path}: {config.num_layers} layers, hidden {config.hidden_size}")
    print(
        f"prefill {args.prefill_len} tokens: tp=1 ({args.threads} threads) {pre[0] * 1e3:.1f} ms,"
        f" tp=2 ({half} thread/rank) {pre[1] * 1e3:.1f} ms; tp=2 / tp=1 = {pre[1] / pre[0]:.2f}"
    )
    print(
        f"decode step {b} x {ctx}: tp=1 fused pass {dec[0] * 1e3:.2f} ms,"
        f" tp=1 layer by layer {dec[1] * 1e3:.2f} ms, tp=2 {dec[2] * 1e3:.2f} ms;"
        f" tp=2 / tp=1 = {dec[2] / dec[0]:.2f}, tp=2 / tp=1 layer by layer = {dec[2] / dec[1]:.2f}"
    )
    print(f"all-reduces per tp=2 step: {2 * config.num_layers}")


if __name__ == "__main__":
    main()
