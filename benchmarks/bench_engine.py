"""Engine benchmarks: the radix cache, prefill, decode and the CPU kernels, each as ratios
measured in one run.

python benchmarks/bench_engine.py all            # every scenario below, default sizes
python benchmarks/bench_engine.py shared-prefix  # radix cache on vs off, shared few-shot prefix
python benchmarks/bench_engine.py no-sharing     # radix cache on vs off, nothing shared
python benchmarks/bench_engine.py salt           # shared-prefix with vs without cache_salt
python benchmarks/bench_engine.py gemm           # the chosen GEMM vs each candidate, model shapes
python benchmarks/bench_engine.py prefill        # uncached prefill vs its weight matmuls alone
python benchmarks/bench_engine.py decode         # decode step vs its weight matmuls; overhead
python benchmarks/bench_engine.py decode-pass    # CPU decode pass vs the layers one by one
python benchmarks/bench_engine.py ttft           # time to first token, cached vs uncached prefix
python benchmarks/bench_engine.py attention-kernel  # the CPU decode attention kernel per ISA build
python benchmarks/bench_engine.py bf16           # bfloat16 weights vs float32: prefill GEMMs, decode
python benchmarks/bench_engine.py mixed          # a prefill chunk + decodes: one forward vs two
python benchmarks/bench_engine.py short-rows     # a short extend + decodes: as a row vs as an extend
python benchmarks/bench_engine.py bursts         # TTFT / ITL under bursts: adaptive vs fixed chunks
python benchmarks/bench_engine.py forward-share  # a shared-prefix run's time: forwards, tokens computed
python benchmarks/bench_engine.py extend-attention  # extends over a cached prefix: the kernel vs torch
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch
import torch.nn.functional as F
from plots import add_plot_arg, bar_charts, line_chart  # benchmarks/plots.py

from radixlm.core.forward import ExtendSeq, KernelRowLayout
from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.core.plan import MAX_ROW_QUERIES, ScheduledSeq
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.engine.engine import Engine
from radixlm.kernels.backend import Backend, choose_backend
from radixlm.kernels.build import isa_variants, load_kernels, open_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.models import layers
from radixlm.models.llama import LlamaForCausalLM
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import build_model
from radixlm.utils import progress


def random_ids(n: int, gen: torch.Generator) -> list[int]:
    """Token ids drawn from the ordinary part of the vocabulary (no special tokens)."""
    return torch.randint(1000, 40000, (n,), generator=gen).tolist()


def run_all(engine: Engine, prompts: list[list[int]], output_len: int) -> float:
    """Submit every prompt at once and wait for all; returns the wall time."""
    params = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t0


def cache_on_off(
    args: argparse.Namespace, prompts: list[list[int]], output_len: int
) -> dict[str, float]:
    """Throughput (requests/s) with the radix cache on and off, same prompts; the two engines
    run alternately for --rounds rounds and each keeps its best, so load drift hits both."""
    best: dict[str, float] = {"on": 0.0, "off": 0.0}
    engines = {
        label: Engine(
            args.model_path,
            disable_radix_cache=disable,
            max_total_tokens=args.max_total_tokens,
            **({} if args.target_itl_ms is None else {"target_itl_ms": args.target_itl_ms}),
        )
        for label, disable in (("on", False), ("off", True))
    }
    try:
        for eng in engines.values():
            run_all(eng, [prompts[0][:64]], 1)  # warm-up
        with progress(args.rounds * len(engines), "cache on / off", "run") as bar:
            for r in range(args.rounds):
                for label, eng in engines.items():
                    eng.flush_cache()
                    wall = run_all(eng, prompts, output_len)
                    passes = eng.get_stats()["num_forward_passes"]
                    best[label] = max(best[label], len(prompts) / wall)
                    bar.write(
                        f"  round {r + 1} cache {label:3s}: {wall:7.2f}s "
                        f"{len(prompts) / wall:7.2f} req/s  (forward passes so far {passes})"
                    )
                    bar.update()
    finally:
        for eng in engines.values():
            eng.shutdown()
    return {**best, "ratio": best["on"] / best["off"]}


def shared_prefix_prompts(args: argparse.Namespace, title: str) -> list[list[int]]:
    """The shared-prefix workload: --questions prompts, one --prefix-len prefix each."""
    gen = torch.Generator().manual_seed(0)
    prefix = random_ids(args.prefix_len, gen)
    prompts = [prefix + random_ids(args.question_len, gen) for _ in range(args.questions)]
    print(
        f"{title}: {args.questions} prompts = {args.prefix_len}-token prefix + "
        f"{args.question_len}-token question, {args.shared_output_len} output tokens"
    )
    return prompts


def bench_shared_prefix(args: argparse.Namespace) -> None:
    prompts = shared_prefix_prompts(args, "shared prefix")
    r = cache_on_off(args, prompts, args.shared_output_len)
    print(f"  throughput cache on / off = {r['ratio']:.2f}x  (target >= 8x)")
    plot_cache_on_off(
        args,
        "radix_shared_prefix",
        f"Shared prefix: {args.questions} x ({args.prefix_len}-token prefix + "
        f"{args.question_len}-token question)",
        r,
    )


def bench_salt(args: argparse.Namespace) -> None:
    """The shared-prefix workload on one engine, unsalted vs salted (one cache_salt) vs salted
    after a public prefix, alternating; then the tree's match_prefix alone, unsalted vs salted."""
    prompts = shared_prefix_prompts(args, "salt")
    prefix = prompts[0][: args.prefix_len]
    params = {"max_new_tokens": args.shared_output_len, "temperature": 0, "ignore_eos": True}
    plain = Engine(args.model_path, max_total_tokens=args.max_total_tokens)
    public = Engine(args.model_path, max_total_tokens=args.max_total_tokens)
    public.add_public_prefix(input_ids=prefix)  # its own engine: salts elsewhere stay whole
    configs = {
        "unsalted": (plain, None),
        "salted": (plain, "tenant-a"),
        "public+salt": (public, "tenant-b"),
    }
    best = dict.fromkeys(configs, 0.0)
    try:
        for eng in (plain, public):
            eng.generate(input_ids=prompts[0][:64], sampling_params={"max_new_tokens": 1})
        with progress(args.rounds * len(configs), "unsalted / salted", "run") as bar:
            for r in range(args.rounds):
                for label, (eng, salt) in configs.items():
                    eng.flush_cache()
                    t0 = time.perf_counter()
                    outs = eng.generate(input_ids=prompts, sampling_params=params, cache_salt=salt)
                    wall = time.perf_counter() - t0
                    assert isinstance(outs, list)
                    hit = sum(o["meta_info"]["cached_tokens"] for o in outs)
                    best[label] = max(best[label], len(prompts) / wall)
                    bar.write(
                        f"  round {r + 1} {label:11s}: {wall:7.2f}s "
                        f"{len(prompts) / wall:7.2f} req/s, {hit} cached tokens"
                    )
                    bar.update()
        for eng in (plain, public):
            eng.check_invariant()
    finally:
        plain.shutdown()
        public.shutdown()
    for label in ("salted", "public+salt"):
        print(f"  throughput {label} / unsalted = {best[label] / best['unsalted']:.3f}")
    _bench_salted_match(prompts, args.repeat)


def _bench_salted_match(prompts: list[list[int]], repeat: int) -> None:
    """match_prefix alone over a tree holding the prompts, unsalted vs salted."""
    from radixlm.cache import RadixCache, SlotAllocator

    trees = {}
    for salt in (None, "tenant-a"):
        cache = RadixCache(SlotAllocator(sum(len(p) for p in prompts)))
        for ids in prompts:
            m = cache.match_prefix(ids, salt=salt)
            slots = cache.allocator.alloc(len(ids) - m.slots.numel())
            assert slots is not None
            cache.lock(m.node)
            cache.cache_finished(ids, torch.cat([m.slots, slots]), m.node, salt=salt)
        trees[salt] = cache

    def matches(salt: str | None) -> Callable[[], None]:
        cache = trees[salt]
        return lambda: [cache.match_prefix(ids, salt=salt) for ids in prompts]

    times = _alternating([matches(None), matches("tenant-a")], max(repeat, 5), "match_prefix")
    per = [min(ts) / len(prompts) * 1e6 for ts in times]
    print(
        f"  match_prefix per call: unsalted {per[0]:.1f} us, salted {per[1]:.1f} us "
        f"(salted / unsalted = {per[1] / per[0]:.3f})"
    )


def bench_no_sharing(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = [random_ids(args.prompt_len, gen) for _ in range(args.prompts)]
    print(
        f"no sharing: {args.prompts} distinct {args.prompt_len}-token prompts, {args.output_len} output tokens"
    )
    r = cache_on_off(args, prompts, args.output_len)
    print(f"  throughput cache on / off = {r['ratio']:.3f}  (target >= 0.95)")
    plot_cache_on_off(
        args,
        "radix_no_sharing",
        f"No sharing: {args.prompts} distinct {args.prompt_len}-token prompts",
        r,
    )


def plot_cache_on_off(args: argparse.Namespace, name: str, title: str, r: dict[str, float]) -> None:
    """With --plot: the two throughputs as bars, the ratio in the title."""
    if args.plot:
        bar_charts(
            args.plot,
            name,
            f"{title}\nradix cache on / off = {r['ratio']:.2f}x",
            ["requests/s"],
            [("requests/s (best round)", {"cache on": [r["on"]], "cache off": [r["off"]]})],
        )


def _alternating(fns: list[Callable[[], Any]], repeat: int, desc: str) -> list[list[float]]:
    """Each fn's wall times, the fns run in turn `repeat` times (after one untimed turn), so
    that load drift on a shared machine hits all of them alike; each turn starts one fn later,
    so that each follows every other equally often (a fn can leave the caches or the sleeping
    threads in a state that helps or hurts the next)."""
    with progress((repeat + 1) * len(fns), desc, "run") as bar:
        for fn in fns:
            fn()
            bar.update()
        times: list[list[float]] = [[] for _ in fns]
        for turn in range(repeat):
            for i in range(len(fns)):
                j = (turn + i) % len(fns)
                t0 = time.perf_counter()
                fns[j]()
                times[j].append(time.perf_counter() - t0)
                bar.update()
    return times


def weight_matmuls(
    core: EngineCore,
    rows: int,
    logit_rows: int,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> Callable[[], None]:
    """The forward's weight GEMMs alone, at the shapes a batch of `rows` tokens runs them,
    through `linear`: `F.linear` in the model's dtype (MKL for float32), or the backend's chosen
    GEMM (over activations as the backend has them)."""
    model = core.runner.model
    dtype, dev = core.runner.dtype, core.runner.device
    act = core.runner.backend.activations if linear is not F.linear else lambda x: x
    weights = model.linear_weights()
    inputs = {
        w.shape[1]: act(torch.randn(rows, w.shape[1], dtype=dtype, device=dev)) for w in weights
    }
    head_in = act(torch.randn(logit_rows, model.lm_head.weight.shape[1], dtype=dtype, device=dev))

    def run() -> None:
        with torch.inference_mode():
            for w in weights:
                linear(inputs[w.shape[1]], w)
            linear(head_in, model.lm_head.weight)

    return run


def pass_matmuls(core: EngineCore, rows: int) -> Callable[[], None] | None:
    """The same GEMMs as the CPU decode pass runs them (each thread its share of every weight's
    columns, in one OpenMP region; the pass's `gemms` entry), then the LM head as the backend
    runs it; None where that pass does not run."""
    runner, model = core.runner, core.runner.model
    decode_pass = model.decode_pass
    if decode_pass is None:
        return None
    x = runner.backend.activations(torch.randn(rows, model.config.hidden_size, dtype=runner.dtype))

    def run() -> None:
        with torch.inference_mode():
            decode_pass.gemms(x, runner.pool.k, runner.pool.v)
            runner.backend.linear(x, model.lm_head.weight)

    return run


def chosen_matmuls(core: EngineCore, rows: int, short_rows: bool) -> Callable[[], None]:
    """The weight GEMMs as a forward of `rows` tokens runs them with the backend's choice: the
    decode pass's where it takes a batch of short rows this size, else the backend's `linear`."""
    decode_pass = core.runner.model.decode_pass
    if short_rows and decode_pass is not None and decode_pass.takes(rows):
        run = pass_matmuls(core, rows)
        assert run is not None
        return run
    return weight_matmuls(core, rows, rows if short_rows else 0, core.runner.backend.linear)


def bench_gemm(args: argparse.Namespace) -> None:
    """Each GEMM candidate of the CPU kernels on the model's linear weights (all layers, as a
    forward runs them) at prefill and decode row counts, alternating, against float32
    `F.linear` (MKL); the backend's choice marked."""
    core = EngineCore(EngineArgs(args.model_path, max_total_tokens=4096))
    backend = core.runner.backend
    print(f"gemm: chosen {backend.gemm}")
    if not isinstance(backend, CpuKernelBackend):
        return
    weights = core.runner.model.linear_weights()
    flops_per_row = 2 * sum(w.numel() for w in weights)
    candidates = backend.gemm_candidates()
    has_peak = backend.fma_peak(1) > 0  # this build has a vector path to time it with
    for rows in args.gemm_rows:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        # Each candidate over the model's own weights, prepared as it needs them.
        runs: dict[str, Callable[[], None]] = {}
        for name, make in candidates.items():
            gemms = [(make(w), inputs[w.shape[1]]) for w in weights]
            runs[name] = functools.partial(_run_all, gemms)
        # The cores' FMA peak is timed between the candidates, as one of them, so that a
        # neighbour's load falls on it alike: the best of its rounds.
        peaks: list[float] = []
        probe = [functools.partial(_append_fma_peak, backend, peaks)] if has_peak else []
        times = _alternating([*runs.values(), *probe], args.repeat, f"gemm {rows} rows")
        speed = {
            name: flops_per_row * rows / statistics.median(t) / 1e9
            for name, t in zip(runs, times[: len(runs)], strict=True)
        }
        chosen = backend.gemm_choice.for_rows(rows)
        figures = ", ".join(
            f"{name}{'*' if name == chosen else ''} {v:6.1f}" for name, v in speed.items()
        )
        print(
            f"  M = {rows:5d}: GFLOP/s {figures}; chosen / F.linear = "
            f"{speed[chosen] / speed['mkl']:.2f}"
        )
        if peaks:
            peak = max(peaks)
            shares = ", ".join(f"{name} {v / peak:.0%}" for name, v in speed.items())
            print(f"           FMA peak {peak:6.1f} GFLOP/s (registers only); of it: {shares}")


def _append_fma_peak(backend: CpuKernelBackend, peaks: list[float]) -> None:
    peaks.append(backend.fma_peak())


def _run_all(gemms: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]) -> None:
    with torch.inference_mode():
        for gemm, x in gemms:
            gemm(x)


def bench_prefill(args: argparse.Namespace) -> None:
    # Room for the uncached prompts, and for the prompts after prefixes (`_prefill_after_prefix`).
    after = args.prefill_prefix + args.prefill_len if args.prefill_prefix else 0
    slots_needed = args.batch * (args.prefill_len + after) + 64
    core = EngineCore(EngineArgs(args.model_path, max_total_tokens=slots_needed))
    gen = torch.Generator().manual_seed(2)
    prompts = [random_ids(args.prefill_len, gen) for _ in range(args.batch)]
    slots = core.allocator.alloc(args.batch * args.prefill_len)
    assert slots is not None
    seqs = [
        ScheduledSeq(
            p, 0, slots[i * args.prefill_len : (i + 1) * args.prefill_len], args.prefill_len - 1
        )
        for i, p in enumerate(prompts)
    ]
    tokens = args.batch * args.prefill_len

    def torch_attention_forward() -> None:
        with _attention_way(core.runner.backend, "split"):
            core.runner.forward(seqs)

    fwd_times, mm_times, torch_times, split_times = _alternating(
        [
            lambda: core.runner.forward(seqs),
            chosen_matmuls(core, tokens, short_rows=False),
            weight_matmuls(core, tokens, 0),
            torch_attention_forward,
        ],
        args.repeat,
        "prefill",
    )
    fwd, mm, ref, split = (
        statistics.median(t) for t in (fwd_times, mm_times, torch_times, split_times)
    )
    print(f"prefill: {args.batch} x {args.prefill_len} uncached tokens (medians)")
    print(
        f"  forward {fwd * 1000:8.1f} ms ({tokens / fwd:7.0f} tok/s); its weight matmuls alone "
        f"{mm * 1000:8.1f} ms ({core.runner.backend.gemm}); float32 F.linear {ref * 1000:8.1f} ms"
    )
    print(f"  forward / matmuls = {fwd / mm:.2f}  (target <= 1.2)")
    print(f"  matmuls vs F.linear = {ref / mm:.2f}x throughput  (target >= 1.5)")
    print(
        f"  forward with torch's fused attention {split * 1000:8.1f} ms: torch's / this = "
        f"{split / fwd:.3f}"
    )
    if args.prefill_prefix:
        _prefill_after_prefix(args, core)


def _prefill_after_prefix(args: argparse.Namespace, core: EngineCore) -> None:
    """New prompts after `--prefill-prefix` cached tokens each, on core's free slots: the
    forward with the CPU's extend attention against the masked calls, alternating."""
    n, p = args.prefill_len, args.prefill_prefix
    gen = torch.Generator().manual_seed(3)
    slots = core.allocator.alloc(args.batch * (p + n))
    assert slots is not None
    rows = [slots[i * (p + n) : (i + 1) * (p + n)] for i in range(args.batch)]
    prefixes = [ScheduledSeq(random_ids(p, gen), 0, r[:p], p - 1) for r in rows]
    core.runner.forward(prefixes)  # the prefixes' K/V into the pool
    seqs = [ScheduledSeq(random_ids(n, gen), p, r, p + n - 1) for r in rows]
    outs: dict[str, torch.Tensor] = {}

    def forward(way: str) -> None:
        with _attention_way(core.runner.backend, way):
            outs[way] = core.runner.forward(seqs)

    times = _alternating(
        [functools.partial(forward, "cpu"), functools.partial(forward, "masked")],
        args.repeat,
        "prefill after a prefix",
    )
    cpu, masked = (statistics.median(t) for t in times)
    diff = (outs["cpu"] - outs["masked"]).abs().max().item()
    print(
        f"prefill: {args.batch} x {n} new tokens after {p} cached each: forward {cpu * 1000:8.1f} "
        f"ms, with the masked extend attention {masked * 1000:8.1f} ms: masked / this = "
        f"{masked / cpu:.2f} (logits differ by at most {diff:.1e})"
    )


def bench_decode(args: argparse.Namespace) -> None:
    for kv_dtype in ("auto", "bfloat16"):
        _bench_decode(args, kv_dtype)


def _decoding(
    model_path: str | None, b: int, ctx: int, steps: int, kv_dtype: str, dtype: str = "auto"
) -> EngineCore:
    """An engine core whose `b` requests have prefilled `ctx` random tokens each and can decode
    `steps` more (and 256 beyond)."""
    slots = b * (ctx + steps + 300) + 64
    core = EngineCore(
        EngineArgs(model_path, max_total_tokens=slots, kv_cache_dtype=kv_dtype, dtype=dtype)
    )
    sched = core.scheduler
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(max_new_tokens=steps + 256, temperature=0, ignore_eos=True)
    for i in range(b):
        core.add(GenerateRequest(f"d{i}", random_ids(ctx, gen), params))
    while sched.waiting or any(r.seq_len - r.kv_len > 1 for r in sched.running):
        core.step()
    return core


def _bench_decode(args: argparse.Namespace, kv_dtype: str) -> None:
    b, ctx = args.decode_batch, args.decode_context
    core = _decoding(args.model_path, b, ctx, args.decode_steps, kv_dtype)
    sched = core.scheduler
    forward_times: list[float] = []
    inner = core.runner.forward

    def timed_forward(seqs: list[ScheduledSeq]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(seqs)
        forward_times.append(time.perf_counter() - t0)
        return out

    core.runner.forward = timed_forward  # type: ignore[method-assign]
    model, runner = core.runner.model, core.runner
    weights = [p for n, p in model.named_parameters() if "proj" in n] + [model.lm_head.weight]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    flat = torch.ones(weight_bytes // 4)  # as many bytes in one tensor: torch.sum's bandwidth

    # Each decode step is followed by the same GEMMs alone, as the step runs them (the chosen
    # GEMM: the decode pass's split, or the backend's `linear`) and as float32 F.linear runs
    # them, and by a plain read of the weights (torch.sum: the memory-bandwidth floor of a
    # small batch). Medians of each.
    baselines = {
        "as the step runs them": chosen_matmuls(core, b, short_rows=True),
        "float32 F.linear": weight_matmuls(core, b, b),
    }
    step_times, read_times, flat_times, *mm_times = _alternating(
        [core.step, functools.partial(_read, weights), flat.sum, *baselines.values()],
        args.decode_steps,
        "decode",
    )
    assert len(sched.running) == b, "every request must still be decoding"
    step = statistics.median(step_times)
    fwd = statistics.median(forward_times[1:])  # the first is the untimed turn's
    mm, ref = (statistics.median(ts) for ts in mm_times)
    read, flat_read = statistics.median(read_times), statistics.median(flat_times)
    print(
        f"decode: batch {b}, {ctx}-token contexts, {args.decode_steps} steps, KV cache {kv_dtype}"
    )
    alone = ", ".join(
        f"{name} {statistics.median(t) * 1000:7.1f} ms"
        for name, t in zip(baselines, mm_times, strict=True)
    )
    print(
        f"  step {step * 1000:7.1f} ms (forward {fwd * 1000:7.1f} ms); weight matmuls alone: {alone}"
    )
    print(f"  GEMM: {core.runner.backend.gemm}")
    print(f"  step / matmuls = {step / mm:.2f}  (target <= 1.3)")
    print(f"  matmuls vs F.linear = {ref / mm:.2f}x throughput  (target >= 1.6)")
    print(f"  time outside the forward = {(step - fwd) / step:.1%} of a step  (target <= 10%)")
    print(
        f"  step / one read of the weights' bytes = {step / flat_read:.2f} as one tensor "
        f"(torch.sum {flat_read * 1000:.1f} ms, {weight_bytes / flat_read / 1e9:.1f} GB/s; "
        f"target at batch 1 <= 1.2), {step / read:.2f} tensor by tensor "
        f"({read * 1000:.1f} ms, {weight_bytes / read / 1e9:.1f} GB/s)"
    )
    kv = runner.pool.k[0]
    kv_bytes = 2 * len(runner.pool.k) * kv.shape[0] * kv.shape[2] * kv.element_size() * b * ctx
    print(
        f"  bytes read per step: weights {weight_bytes / 1e6:.0f} MB (the GEMMs), "
        f"K/V {kv_bytes / 1e6:.0f} MB (attention)"
    )


class _LayerByLayer(CpuKernelBackend):
    """The CPU kernels without their decode pass: the layers run one by one."""

    def decode_pass(self, *args: Any, **kwargs: Any) -> None:
        return None


def bench_decode_pass(args: argparse.Namespace) -> None:
    """Decode steps with the CPU decode pass (every layer in one OpenMP region) against the
    layers one by one, alternating, at several batch sizes; then again next to a process that
    keeps one core busy (a shared machine). Both run on the same cores (the same requests and
    pool): the layer-by-layer model is the same weights over a backend without the pass. Each
    `--kernel-lib` build (e.g. another checkout's) runs the pass too, over the same weights,
    alternating with this build's: the ratio of two builds within one process."""
    settings = [("", False)] + ([(" next to a busy process", True)] if args.pass_neighbour else [])
    paths = 2 + len(args.kernel_lib)
    steps = len(settings) * paths * (args.decode_steps + 1)  # one untimed turn each
    ctx = args.decode_context
    cores = {b: _decoding(args.model_path, b, ctx, steps, "auto") for b in args.pass_batches}
    first = cores[args.pass_batches[0]]
    runner = first.runner
    if not isinstance(runner.backend, CpuKernelBackend) or runner.model.decode_pass is None:
        print("decode pass: not available here (no compiler, or torch without MKL)")
        return
    _, weights = load_model_files(first.model_path)
    layers = build_model(
        first.model_config, weights, runner.device, runner.dtype, _LayerByLayer(runner.backend.lib)
    )
    others = {
        path: build_model(
            first.model_config,
            weights,
            runner.device,
            runner.dtype,
            CpuKernelBackend(open_kernels(Path(path))),
        )
        for path in args.kernel_lib
    }
    del weights
    fused_models = {b: core.runner.model for b, core in cores.items()}

    def step(core: EngineCore, model: LlamaForCausalLM) -> Callable[[], None]:
        def run() -> None:
            core.runner.model = model
            core.step()

        return run

    curves: dict[str, list[float]] = {}
    for label, busy in settings:
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for b, core in cores.items():
                fused, layered, *other = _alternating(
                    [
                        step(core, fused_models[b]),
                        step(core, layers),
                        *(step(core, model) for model in others.values()),
                    ],
                    args.decode_steps,
                    f"decode pass, batch {b}{label}",
                )
                f, lay = statistics.median(fused), statistics.median(layered)
                curves.setdefault(f"decode pass{label}", []).append(f * 1000)
                curves.setdefault(f"layer by layer{label}", []).append(lay * 1000)
                print(
                    f"decode pass{label}: batch {b} x {ctx}: pass {f * 1000:7.1f} ms, "
                    f"layer by layer {lay * 1000:7.1f} ms: layers / pass = {lay / f:.2f}"
                )
                for path, times in zip(others, other, strict=True):
                    o = statistics.median(times)
                    print(f"  {path}: pass {o * 1000:7.1f} ms: that build / this = {o / f:.3f}")
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    if args.plot:
        line_chart(
            args.plot,
            "decode_step_vs_batch",
            f"Decode step time vs batch size (context {ctx} tokens each)",
            "batch size (requests decoding together)",
            "ms per decode step (median)",
            args.pass_batches,
            curves,
        )


def bench_ttft(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(4)
    prefix = random_ids(args.prefix_len, gen)
    with Engine(args.model_path, max_total_tokens=args.max_total_tokens) as eng:
        params = {"max_new_tokens": 1, "temperature": 0}

        def ttft(ids: list[int]) -> float:
            t0 = time.perf_counter()
            for _ in eng.generate(input_ids=ids, sampling_params=params, stream=True):
                return time.perf_counter() - t0
            raise AssertionError("no output")

        ttft(random_ids(32, gen))  # warm-up
        uncached, cached = [], []
        with progress(args.repeat, "TTFT, uncached and cached", "pair") as bar:
            for _ in range(args.repeat):
                eng.flush_cache()
                uncached.append(ttft(prefix + random_ids(args.question_len, gen)))
                cached.append(ttft(prefix + random_ids(args.question_len, gen)))
                bar.update()
    u, c = statistics.median(uncached), statistics.median(cached)
    print(f"TTFT: {args.prefix_len}-token prefix + {args.question_len}-token question")
    print(
        f"  uncached {u * 1000:7.1f} ms, cached prefix {c * 1000:7.1f} ms: cached / uncached = {c / u:.3f}"
    )


def bench_mixed(args: argparse.Namespace) -> None:
    """A mixed step (one prefill chunk + decode rows at --decode-context keys) as the engine
    runs it, one forward (the rows join the layer path's GEMMs and take the short-row attention
    kernel), against two forwards (the chunk, then the rows through the decode pass), and
    against each part alone; alternating, medians."""
    chunks, batches = args.mixed_chunks, args.mixed_batches
    ctx = args.decode_context
    slots = max(chunks) + max(batches) * (ctx + 1) + 64
    core = EngineCore(EngineArgs(args.model_path, max_total_tokens=slots))
    runner, alloc = core.runner, core.allocator
    gen = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(max(batches)):
        kv = alloc.alloc(ctx + 1)
        assert kv is not None
        rows.append(ScheduledSeq(random_ids(1, gen), ctx, kv, ctx))
    print(f"mixed: one prefill chunk + decode rows at {ctx}-token contexts (medians)")
    for c in chunks:
        kv = alloc.alloc(c)
        assert kv is not None
        chunk = [ScheduledSeq(random_ids(c, gen), 0, kv, c - 1)]
        for b in batches:
            decodes = rows[:b]
            fwd = runner.forward
            one, two, alone_chunk, alone_rows = _alternating(
                [
                    functools.partial(fwd, chunk + decodes),
                    functools.partial(_forwards, fwd, [chunk, decodes]),
                    functools.partial(fwd, chunk),
                    functools.partial(fwd, decodes),
                ],
                args.repeat,
                f"mixed, {c} + {b}",
            )
            m1, m2, mc, md = (
                statistics.median(t) * 1000 for t in (one, two, alone_chunk, alone_rows)
            )
            print(
                f"  chunk {c:5d} + {b:3d} decodes: one forward {m1:8.1f} ms, two forwards "
                f"{m2:8.1f} ms; alone: chunk {mc:8.1f} ms, decodes {md:7.1f} ms "
                f"(decode pass: {runner.model.decode_pass is not None})"
            )
            print(
                f"    one / two forwards = {m1 / m2:.2f}; one forward / (chunk + decodes alone) "
                f"= {m1 / (mc + md):.2f}"
            )
        alloc.free(kv)


def bench_short_rows(args: argparse.Namespace) -> None:
    """Steps with one short extend (--row-prompts new tokens after --row-prefix cached ones: a
    short turn, a tool's answer; 0: an uncached prompt) beside decode rows (--mixed-batches at
    --decode-context keys), the extend as a short row (the backend's max_row_queries) against
    as an extend (rows capped at MAX_ROW_QUERIES, the torch backend's), alternating, medians."""
    core = EngineCore(EngineArgs(args.model_path, max_total_tokens=args.max_total_tokens))
    runner, alloc = core.runner, core.allocator
    backend = runner.backend
    longest = backend.max_row_queries
    gen = torch.Generator().manual_seed(6)
    ctx, prefix = args.decode_context, args.row_prefix
    decodes = []
    for _ in range(max(args.mixed_batches)):
        kv = alloc.alloc(ctx + 1)
        assert kv is not None
        decodes.append(ScheduledSeq(random_ids(1, gen), ctx, kv, ctx))

    def capped(seqs: list[ScheduledSeq]) -> None:
        backend.max_row_queries = MAX_ROW_QUERIES  # type: ignore[misc]  (this instance's)
        try:
            runner.forward(seqs)
        finally:
            del backend.max_row_queries  # type: ignore[misc]  (the class's again)

    print(
        f"short rows: {backend.name} takes rows of up to {longest} tokens; as extends: over "
        f"{MAX_ROW_QUERIES} (medians)"
    )
    if longest <= MAX_ROW_QUERIES:
        print("  nothing to compare on this backend")
        return
    for b in args.mixed_batches:
        for n in args.row_prompts:
            kv = alloc.alloc(prefix + n)
            assert kv is not None
            seqs = [ScheduledSeq(random_ids(n, gen), prefix, kv, prefix + n - 1), *decodes[:b]]
            as_row, as_extend = _alternating(
                [functools.partial(runner.forward, seqs), functools.partial(capped, seqs)],
                args.repeat,
                f"short rows, {n} + {b}",
            )
            r, e = (statistics.median(t) * 1000 for t in (as_row, as_extend))
            print(
                f"  {n:3d} new tokens after {prefix} cached + {b:3d} decodes: as a row "
                f"{r:7.1f} ms, as an extend {e:7.1f} ms: extend / row = {e / r:.2f}"
            )
            alloc.free(kv)


def _forwards(
    forward: Callable[[list[ScheduledSeq]], torch.Tensor], batches: list[list[ScheduledSeq]]
) -> None:
    for batch in batches:
        forward(batch)


def bench_bursts(args: argparse.Namespace) -> None:
    """Requests arriving in bursts while others decode, in one engine core with the adaptive
    prefill budget (--target-itl-ms) and one with whole chunks (target 0), alternating rounds:
    time to first token of the burst requests and inter-token latency of every request."""
    target = 500.0 if args.target_itl_ms is None else args.target_itl_ms
    targets = {"adaptive": target, "fixed chunks": 0.0}
    cores = {
        label: EngineCore(
            EngineArgs(args.model_path, max_total_tokens=args.max_total_tokens, target_itl_ms=t)
        )
        for label, t in targets.items()
    }
    n_dec, dec_len = args.burst_decoders, args.burst_decode_len
    print(
        f"bursts: {n_dec} requests decoding {dec_len} tokens ({args.prompt_len}-token prompts); "
        f"{args.bursts} bursts of {args.burst_size} x {args.burst_prompt_len}-token prompts "
        f"({args.burst_output_len} output tokens) every {args.burst_interval:g} s; "
        f"adaptive target {target:g} ms"
    )
    results: dict[str, dict[str, list[float]]] = {
        label: {"ttft": [], "itl": [], "wall": []} for label in cores
    }
    with progress(args.rounds * len(cores), "bursts", "run") as bar:
        for r in range(args.rounds):
            for label, core in cores.items():
                core.scheduler.cache.flush()
                ttft, itl, wall = _run_bursts(core, args, seed=r)
                res = results[label]
                res["ttft"] += ttft
                res["itl"] += itl
                res["wall"].append(wall)
                bar.write(
                    f"  round {r + 1} {label:12s}: {wall:6.1f} s, TTFT p50 "
                    f"{_pct(ttft, 50) * 1000:7.0f} ms, ITL p99 {_pct(itl, 99) * 1000:7.0f} ms"
                )
                bar.update()
    for label, res in results.items():
        ttft, itl = res["ttft"], res["itl"]
        print(
            f"  {label:12s}: TTFT p50 {_pct(ttft, 50) * 1000:7.0f} ms p99 "
            f"{_pct(ttft, 99) * 1000:7.0f} ms; ITL p50 {_pct(itl, 50) * 1000:6.0f} ms p99 "
            f"{_pct(itl, 99) * 1000:6.0f} ms; run {min(res['wall']):6.1f} s (best)"
        )
    a, f = results["adaptive"], results["fixed chunks"]
    print(
        f"  adaptive / fixed: TTFT p50 {_pct(a['ttft'], 50) / _pct(f['ttft'], 50):.2f}, "
        f"p99 {_pct(a['ttft'], 99) / _pct(f['ttft'], 99):.2f}; ITL p50 "
        f"{_pct(a['itl'], 50) / _pct(f['itl'], 50):.2f}, p99 "
        f"{_pct(a['itl'], 99) / _pct(f['itl'], 99):.2f}; run time "
        f"{min(a['wall']) / min(f['wall']):.2f}"
    )


def _pct(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100))


def _run_bursts(
    core: EngineCore, args: argparse.Namespace, seed: int
) -> tuple[list[float], list[float], float]:
    """One run of the burst workload, stepping `core` in real time: the burst requests' times
    to first token, every gap between two tokens of a request, and the wall time."""
    gen = torch.Generator().manual_seed(100 + seed)

    def req(rid: str, n: int, out: int) -> GenerateRequest:
        params = SamplingParams(max_new_tokens=out, temperature=0, ignore_eos=True)
        return GenerateRequest(rid, random_ids(n, gen), params)

    arrivals = [
        (0.0, req(f"d{i}", args.prompt_len, args.burst_decode_len))
        for i in range(args.burst_decoders)
    ]
    for k in range(args.bursts):
        at = args.burst_interval * (k + 1)
        arrivals += [
            (at, req(f"b{k}.{j}", args.burst_prompt_len, args.burst_output_len))
            for j in range(args.burst_size)
        ]
    due = {msg.rid: at for at, msg in arrivals}
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    t0 = time.perf_counter()
    pending = list(arrivals)
    while pending or core.has_work:
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            core.add(pending.pop(0)[1])
        if not core.has_work:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        with torch.inference_mode():
            outputs = core.step()
        now = time.perf_counter() - t0
        for o in outputs:
            if not o.new_ids:
                continue
            if o.rid in last:
                itl.append(now - last[o.rid])
            elif o.rid.startswith("b"):
                ttft.append(now - due[o.rid])
            last[o.rid] = now
    core.check_invariant()
    return ttft, itl, time.perf_counter() - t0


def bench_attention_kernel(args: argparse.Namespace) -> None:
    """The short-row attention kernel alone at the decode shape (SmolLM2's heads, one pool per
    layer, contiguous slots), built for this CPU and for the paths other CPUs take (and any
    `--kernel-lib` builds, e.g. another checkout's, to compare in one run), against a plain
    read of the same K/V (torch.sum): the memory-bandwidth floor. Rows of more than one query
    (`--attention-queries`) are what a speculative step verifies."""
    layers, heads, kv_heads, d = 30, 9, 3, 64
    b, n = args.decode_batch, args.decode_context
    libs = {name: load_kernels(flags) for name, flags in isa_variants().items()}
    libs.update({path: open_kernels(Path(path)) for path in args.kernel_lib})
    builds = {name: CpuKernelBackend(lib) for name, lib in libs.items() if lib is not None}
    row_kv = (torch.arange(b * n) + 1).view(b, n)
    for nq in args.attention_queries:
        q = torch.randn(b * nq, heads, d)
        out = torch.empty_like(q)
        spans = torch.stack(
            [torch.arange(b) * nq, torch.full((b,), nq, dtype=torch.long), torch.full((b,), n)]
        )
        rows = KernelRowLayout(row_kv, spans)
        for dtype in (torch.float32, torch.bfloat16):
            pools = [
                tuple(torch.randn(kv_heads, b * n + 1, d).to(dtype) for _ in range(2))
                for _ in range(layers)
            ]
            fns: dict[str, Callable[[], None]] = {
                name: functools.partial(_attend_layers, backend, pools, q, rows, out)
                for name, backend in builds.items()
            }
            fns["plain read (torch.sum)"] = functools.partial(
                _read, [t for kv in pools for t in kv]
            )
            runs = _alternating(list(fns.values()), args.repeat, f"attention kernel, {dtype}")
            times = [statistics.median(t) for t in runs]
            nbytes = 2 * layers * kv_heads * b * n * d * pools[0][0].element_size()
            print(
                f"attention kernel: {layers} layers x {b} rows of {nq} queries x {n} keys, "
                f"{dtype}: {nbytes / 1e6:.0f} MB of K/V"
            )
            for name, t in zip(fns, times, strict=True):
                print(f"  {name:24s} {t * 1000:7.1f} ms  {nbytes / t / 1e9:5.1f} GB/s")


def _attend_layers(
    backend: CpuKernelBackend,
    pools: list[tuple[torch.Tensor, ...]],
    q: torch.Tensor,
    rows: KernelRowLayout,
    out: torch.Tensor,
) -> None:
    """Decode attention over every layer's pool, as a forward runs it layer by layer."""
    for k, v in pools:
        backend.row_attention(q, k, v, rows, q.shape[-1] ** -0.5, out)


def _read(tensors: list[torch.Tensor]) -> None:
    """A plain read of every tensor (torch.sum): the memory-bandwidth floor."""
    for t in tensors:
        t.sum()


def bench_bf16(args: argparse.Namespace) -> None:
    """bfloat16 weights against float32, alternating in one run: the prefill's weight GEMMs as
    a bfloat16 forward runs them against float32 `F.linear` (MKL) at `--batch` x
    `--prefill-len` rows, the uncached prefill forward in each dtype, and decode steps at
    each of `--pass-batches` over `--decode-context`-token contexts (each dtype's default KV
    pool: the model's dtype)."""
    tokens = args.batch * args.prefill_len
    cores = {
        dtype: EngineCore(EngineArgs(args.model_path, max_total_tokens=tokens + 64, dtype=dtype))
        for dtype in ("float32", "bfloat16")
    }
    print("bf16: backends " + ", ".join(f"{d} {c.runner.backend.name}" for d, c in cores.items()))
    print(f"  bfloat16 GEMM: {cores['bfloat16'].runner.backend.gemm}")
    gen = torch.Generator().manual_seed(2)
    prompts = [random_ids(args.prefill_len, gen) for _ in range(args.batch)]
    forwards = {}
    for dtype, core in cores.items():
        slots = core.allocator.alloc(tokens)
        assert slots is not None
        n = args.prefill_len
        seqs = [
            ScheduledSeq(p, 0, slots[i * n : (i + 1) * n], n - 1) for i, p in enumerate(prompts)
        ]
        forwards[dtype] = functools.partial(core.runner.forward, seqs)
    bf16_mm, f32_mm, f32_fwd, bf16_fwd = (
        statistics.median(t)
        for t in _alternating(
            [
                chosen_matmuls(cores["bfloat16"], tokens, short_rows=False),
                weight_matmuls(cores["float32"], tokens, 0),
                forwards["float32"],
                forwards["bfloat16"],
            ],
            args.repeat,
            "bf16 prefill",
        )
    )
    print(f"bf16 prefill: {args.batch} x {args.prefill_len} uncached tokens (medians)")
    print(
        f"  weight GEMMs: bfloat16 {bf16_mm * 1000:8.1f} ms, float32 F.linear "
        f"{f32_mm * 1000:8.1f} ms: bfloat16 vs F.linear = {f32_mm / bf16_mm:.2f}x throughput"
        "  (target >= 2.8 with native bfloat16)"
    )
    print(
        f"  forward: bfloat16 {bf16_fwd * 1000:8.1f} ms ({tokens / bf16_fwd:7.0f} tok/s), float32 "
        f"{f32_fwd * 1000:8.1f} ms ({tokens / f32_fwd:7.0f} tok/s): bfloat16 / float32 = "
        f"{f32_fwd / bf16_fwd:.2f}x throughput"
    )
    del cores, forwards
    ctx = args.decode_context
    for b in args.pass_batches:
        decoding = {
            dtype: _decoding(args.model_path, b, ctx, 2 * (args.decode_steps + 1), "auto", dtype)
            for dtype in ("float32", "bfloat16")
        }
        f32, bf16 = (
            statistics.median(t)
            for t in _alternating(
                [c.step for c in decoding.values()], args.decode_steps, f"bf16 decode, batch {b}"
            )
        )
        print(
            f"bf16 decode: batch {b} x {ctx}: step float32 {f32 * 1000:7.1f} ms, bfloat16 "
            f"{bf16 * 1000:7.1f} ms: float32 / bfloat16 = {f32 / bf16:.2f}"
        )


def bench_forward_share(args: argparse.Namespace) -> None:
    """Where the time of a generated-shared-prefix workload goes (bench_serving.py's dataset,
    in process, every request added at once): the share of the wall time spent in forward
    passes, by kind of step, and the prompt tokens computed against the fewest a prefix cache
    can compute (each prefix once, then each question). With the forward at ~100% and the
    tokens at the minimum, only a faster forward makes such a run faster."""
    core = EngineCore(EngineArgs(args.model_path, max_total_tokens=args.max_total_tokens))
    gen = torch.Generator().manual_seed(5)
    per_group = max(1, args.questions // args.groups)
    prompts = []
    for _ in range(args.groups):
        prefix = random_ids(args.prefix_len, gen)
        prompts += [prefix + random_ids(args.question_len, gen) for _ in range(per_group)]
    order = torch.randperm(len(prompts), generator=gen).tolist()
    kinds: dict[str, list[float]] = {}  # kind -> [forwards, seconds, prompt tokens, decode rows]
    inner = core.runner.forward

    def timed_forward(seqs: list[ScheduledSeq]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(seqs)
        seconds = time.perf_counter() - t0
        # A decode feeds one token after its prompt; everything else is prompt (extend) work.
        decodes = sum(1 for s in seqs if len(s.new_ids) == 1 and s.start > 0)
        prompt = sum(len(s.new_ids) for s in seqs) - decodes
        kind = "decode-only" if not prompt else "mixed" if decodes else "prompt-only"
        row = kinds.setdefault(kind, [0, 0.0, 0, 0])
        row[0] += 1
        row[1] += seconds
        row[2] += prompt
        row[3] += decodes
        return out

    core.runner.forward = timed_forward  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=args.shared_output_len, temperature=0, ignore_eos=True)
    for i in order:
        core.add(GenerateRequest(f"q{i}", prompts[i], params))
    t0 = time.perf_counter()
    with torch.inference_mode():
        while core.has_work:
            core.step()
    wall = time.perf_counter() - t0
    core.check_invariant()
    forward = sum(row[1] for row in kinds.values())
    computed = sum(int(row[2]) for row in kinds.values())
    fewest = args.groups * args.prefix_len + len(prompts) * args.question_len
    print(
        f"forward share: {args.groups} groups x {per_group} prompts, {args.prefix_len}-token "
        f"prefix + {args.question_len}-token question, {args.shared_output_len} out, all at once"
    )
    print(f"  wall {wall:.2f} s, in forward passes {forward:.2f} s ({forward / wall:.1%})")
    for kind, (n, seconds, prompt, decodes) in kinds.items():
        print(
            f"  {kind:11s}: {int(n):4d} forwards, {seconds:7.2f} s, prompt tokens {int(prompt):6d}, "
            f"decode rows {int(decodes):5d}"
        )
    print(
        f"  prompt tokens computed {computed} (the fewest a prefix cache can: {fewest}); "
        f"{computed / max(1e-9, forward - kinds.get('decode-only', [0, 0.0])[1]):.0f} per "
        "second of the forwards that carried them"
    )


def _extend_attention(
    outs: dict[str, torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extends: list[ExtendSeq],
    name: str,
    *,
    way: str,
    backend: Backend,
) -> None:
    """outs[name] = the extends' attention (k, v the pool, and this step's K/V for an extend
    with no prefix), taken `way` (see _attention_way): the kernels' in one call, torch's one
    extend at a time over its gathered K/V."""
    scale = q.shape[-1] ** -0.5
    with _attention_way(backend, way):
        layout = backend.extend_layout(extends, None)
        out = torch.empty_like(q)
        if layout is None or not backend.extend_attention(q, k, v, k, v, layout, scale, out):
            for e in extends:
                rows = slice(e.q_start, e.q_start + e.q_len)
                own = k[:, rows], v[:, rows]
                out[rows] = layers._torch_extend(q[rows], *own, k, v, e, scale, None)
        outs[name] = out


@contextlib.contextmanager
def _attention_way(backend: Backend, way: str) -> Iterator[None]:
    """Extends attend `way`: "cpu" as the CPU does now (the kernels' extend attention where the
    backend has it, else torch's fused attention split from a long prefix), "split" in torch's
    fused attention as the CPU did before the kernel, or "masked" in the masked calls other
    devices take."""
    saved = layers._FLASH_CPU
    if way != "cpu":
        backend.extend_attention = _no_kernel  # type: ignore[method-assign]
    if way == "masked":
        layers._FLASH_CPU = None
    try:
        yield
    finally:
        layers._FLASH_CPU = saved
        vars(backend).pop("extend_attention", None)


def _no_kernel(*args: object) -> bool:
    return False


def bench_extend_attention(args: argparse.Namespace) -> None:
    """Attention of `--extend-group` extends over one cached prefix (queries x prefix keys each,
    9 / 3 heads of 64, as the default model), the way the CPU takes them (the kernels' extend
    attention: all in one call, the prefix gathered once) against torch's fused attention split
    from the prefix as the CPU took it before, and the masked calls other devices take (one
    extend at a time, each over its gathered K/V), alternating; medians, and each one's largest
    error against float64."""
    h, kvh, d = 9, 3, 64
    n = args.extend_group
    backend = choose_backend(torch.device("cpu"), torch.float32, torch.float32)
    gen = torch.Generator().manual_seed(4)
    print(
        f"extend attention over a cached prefix, {h} / {kvh} heads of {d} ({backend.name}), "
        f"{n} extend(s) a step over the same prefix"
    )
    for t, prefix in args.extend_shapes:
        q = torch.randn(n * t, h, d, generator=gen)
        k = torch.randn(kvh, prefix + n * t, d, generator=gen)
        v = torch.randn(kvh, prefix + n * t, d, generator=gen)
        extends = [
            ExtendSeq(
                i * t,
                t,
                prefix,
                torch.cat([torch.arange(prefix), prefix + i * t + torch.arange(t)]),
            )
            for i in range(n)
        ]
        g = h // kvh
        hidden = torch.ones(t, prefix + t, dtype=torch.bool).tril(prefix).logical_not()
        refs = []
        for e in extends:
            ke, ve = (x[:, e.kv_slots].double().repeat_interleave(g, 0) for x in (k, v))
            qe = q[e.q_start : e.q_start + t].double().transpose(0, 1)
            scores = qe @ ke.mT * d**-0.5
            probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
            refs.append((probs @ ve).transpose(0, 1))
        ref = torch.cat(refs)
        outs: dict[str, torch.Tensor] = {}
        run = functools.partial(_extend_attention, outs, q, k, v, extends, backend=backend)
        ways = ("cpu", "split", "masked")
        times = _alternating(
            [functools.partial(run, way, way=way) for way in ways],
            args.repeat,
            f"extend {t} x {prefix}",
        )
        cpu, split, masked = (statistics.median(ts) for ts in times)
        errors = {name: (o.double() - ref).abs().max().item() for name, o in outs.items()}
        flops = n * 4 * h * d * (t * prefix + t * (t + 1) // 2)
        print(
            f"  {t:5d} queries x {prefix:5d} prefix keys: this way {cpu * 1000:7.2f} ms "
            f"({flops / cpu / 1e9:5.1f} GFLOP/s), torch split {split * 1000:7.2f} ms, masked "
            f"{masked * 1000:7.2f} ms: split / this = {split / cpu:.2f}, masked / this = "
            f"{masked / cpu:.2f} (max error {errors['cpu']:.1e} / {errors['split']:.1e} / "
            f"{errors['masked']:.1e})"
        )


SCENARIOS = {
    "shared-prefix": bench_shared_prefix,
    "no-sharing": bench_no_sharing,
    "salt": bench_salt,
    "prefill": bench_prefill,
    "gemm": bench_gemm,
    "decode": bench_decode,
    "decode-pass": bench_decode_pass,
    "ttft": bench_ttft,
    "attention-kernel": bench_attention_kernel,
    "bf16": bench_bf16,
    "mixed": bench_mixed,
    "short-rows": bench_short_rows,
    "bursts": bench_bursts,
    "forward-share": bench_forward_share,
    "extend-attention": bench_extend_attention,
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--max-total-tokens", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of cache on/off")
    p.add_argument("--questions", type=int, default=128)
    p.add_argument("--groups", type=int, default=8, help="forward-share: prefixes")
    p.add_argument("--prefix-len", type=int, default=1200)
    p.add_argument("--question-len", type=int, default=60)
    p.add_argument("--shared-output-len", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--gemm-rows", type=lambda v: [int(x) for x in v.split(",")], default=[2048, 1024, 32, 1]
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument(
        "--prefill-prefix", type=int, default=0, help="prefill: also after this many cached tokens"
    )
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=10)
    p.add_argument(
        "--attention-queries",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1],
        help="attention-kernel: queries per row (1: decode; more: a verified draft)",
    )
    p.add_argument(
        "--kernel-lib",
        action="append",
        default=[],
        help="attention-kernel, decode-pass: another kernels build (.so) to time alongside "
        "this one's",
    )
    p.add_argument(
        "--pass-batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 32]
    )
    p.add_argument(
        "--pass-neighbour",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode-pass: also run next to a busy process",
    )
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    shapes = lambda v: [tuple(int(n) for n in x.split("x")) for x in v.split(",")]  # noqa: E731
    p.add_argument(
        "--extend-shapes",
        type=shapes,
        default=[(60, 1200), (256, 512), (256, 2048), (512, 1536), (1024, 1024), (2048, 2048)],
        help="extend-attention: QUERIESxPREFIX,...",
    )
    p.add_argument(
        "--extend-group", type=int, default=1, help="extend-attention: extends a step, one prefix"
    )
    p.add_argument("--mixed-chunks", type=ints, default=[512, 2048], help="mixed: chunk sizes")
    p.add_argument(
        "--mixed-batches", type=ints, default=[8, 32], help="mixed, short-rows: decode rows"
    )
    p.add_argument("--row-prompts", type=ints, default=[17, 32, 60], help="short-rows: new tokens")
    p.add_argument("--row-prefix", type=int, default=300, help="short-rows: cached tokens")
    p.add_argument(
        "--target-itl-ms",
        type=float,
        help="the engines' target_itl_ms (default: the engine's; bursts: 500, against 0)",
    )
    p.add_argument("--burst-decoders", type=int, default=8, help="bursts: requests decoding")
    p.add_argument("--burst-decode-len", type=int, default=128, help="bursts: their output")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--burst-size", type=int, default=4, help="bursts: requests per burst")
    p.add_argument("--burst-prompt-len", type=int, default=256)
    p.add_argument("--burst-output-len", type=int, default=16)
    p.add_argument("--burst-interval", type=float, default=6.0, help="bursts: seconds apart")
    add_plot_arg(p)
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    for name, fn in SCENARIOS.items():
        if args.scenario in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
