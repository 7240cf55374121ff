"""The disk KV tier (`--kv-cache-dir`), as ratios measured in one run.

python benchmarks/bench_disk.py all            # the three scenarios below, default sizes
python benchmarks/bench_disk.py restart-ttft   # after a restart: TTFT with the prefix on disk vs uncached
python benchmarks/bench_disk.py capacity       # shared prefixes ~4x the pool: throughput with vs without the tier
python benchmarks/bench_disk.py decode         # decode step time, tier on and idle vs off
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch

from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.utils import progress


def random_ids(n: int, gen: torch.Generator) -> list[int]:
    """Token ids from the ordinary part of the vocabulary."""
    return torch.randint(1000, 40000, (n,), generator=gen).tolist()


def core(model_path: str | None, **args: Any) -> EngineCore:
    return EngineCore(EngineArgs(model_path=model_path, random_seed=0, **args))


def serve(c: EngineCore, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """Run prompts together to completion; returns (seconds to the first output token of the
    first prompt, cached prompt tokens in all)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        c.add(GenerateRequest(rid=str(i), input_ids=p, params=params))
    ttft, cached = 0.0, {}
    with torch.inference_mode():
        while c.has_work:
            for out in c.step():
                if out.rid == "0" and out.new_ids and not ttft:
                    ttft = time.perf_counter() - t0
                cached[out.rid] = out.cached_tokens
    return ttft, sum(cached.values())


def restart_ttft(model: str | None, prefix_len: int, reps: int) -> None:
    """A 1,200-token prefix written to disk, the engine restarted, then alternately: a request on
    that prefix (loaded from disk; the pool is emptied after each) and one on a new prefix."""
    gen = torch.Generator().manual_seed(0)
    prefix = random_ids(prefix_len, gen)
    with tempfile.TemporaryDirectory() as kv_dir:
        first = core(model, kv_cache_dir=kv_dir)
        serve(first, [prefix + random_ids(16, gen)], 1)
        first.close()  # graceful: the prefix (>= 256 tokens) is written
        c = core(model, kv_cache_dir=kv_dir)
        on_disk = c.stats().disk_cache_tokens
        serve(c, [random_ids(prefix_len + 16, gen)], 1)  # warm-up, uncached
        with torch.inference_mode():
            c.cache.evict(c.allocator.num_slots)
        disk_t, cold_t = [], []
        with progress(2 * reps, "restart-ttft: from disk / uncached", "req") as bar:
            for _ in range(reps):
                t, hit = serve(c, [prefix + random_ids(16, gen)], 1)
                assert hit >= prefix_len, f"expected a disk hit, cached {hit}"
                disk_t.append(t)
                with torch.inference_mode():
                    c.cache.evict(c.allocator.num_slots)
                bar.update()
                t, hit = serve(c, [random_ids(prefix_len + 16, gen)], 1)
                assert hit == 0
                cold_t.append(t)
                with torch.inference_mode():
                    c.cache.evict(c.allocator.num_slots)
                bar.update()
        c.close()
    disk, cold = statistics.median(disk_t), statistics.median(cold_t)
    print(f"restart-ttft: {on_disk} tokens on disk after the restart, prefix {prefix_len} tokens")
    print(f"  TTFT p50 uncached {cold * 1e3:.1f} ms, prefix from disk {disk * 1e3:.1f} ms")
    print(f"  disk / uncached = {disk / cold:.3f}  (target <= 0.15)")


def capacity(
    model: str | None, num_prompts: int, prompt_len: int, pool: int, rounds: int, batch: int
) -> None:
    """num_prompts system prompts whose K/V needs several pools, questions cycling over them in
    batches; rounds after the first alternate between the engine with the tier and without."""
    gen = torch.Generator().manual_seed(1)
    systems = [random_ids(prompt_len, gen) for _ in range(num_prompts)]
    with tempfile.TemporaryDirectory() as kv_dir:
        engines = {
            "disk tier": core(model, max_total_tokens=pool, kv_cache_dir=kv_dir),
            "pool only": core(model, max_total_tokens=pool),
        }
        times: dict[str, float] = dict.fromkeys(engines, 0.0)
        hits: dict[str, int] = dict.fromkeys(engines, 0)
        total_prompt = 0
        with progress(rounds * len(engines), "capacity: tier / pool only", "run") as bar:
            for r in range(rounds):
                questions = [s + random_ids(24, gen) for s in systems]
                for name, c in engines.items():
                    t0 = time.perf_counter()
                    cached = 0
                    for i in range(0, len(questions), batch):
                        cached += serve(c, questions[i : i + batch], 8)[1]
                    if r > 0:  # the first round fills both caches
                        times[name] += time.perf_counter() - t0
                        hits[name] += cached
                    bar.update()
                if r > 0:
                    total_prompt += sum(len(q) for q in questions)
        for c in engines.values():
            c.close()
    requests = num_prompts * (rounds - 1)
    print(
        f"capacity: {num_prompts} prompts x {prompt_len} tokens "
        f"({num_prompts * prompt_len / pool:.1f}x the {pool}-token pool), {rounds - 1} measured rounds"
    )
    for name in engines:
        print(
            f"  {name}: {requests / times[name]:.2f} req/s, "
            f"hit rate {hits[name] / total_prompt:.1%}"
        )
    ratio = times["pool only"] / times["disk tier"]
    print(f"  throughput with / without the tier = {ratio:.2f}x  (target >= 2)")


def decode(model: str | None, batch: int, steps: int, reps: int) -> None:
    """Decode steps of a batch, alternating between an engine with an idle tier and one without."""
    gen = torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory() as kv_dir:
        engines = {"tier on": core(model, kv_cache_dir=kv_dir), "tier off": core(model)}
        prompts = [random_ids(64, gen) for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_new_tokens=10_000, ignore_eos=True)
        step_times: dict[str, list[float]] = {name: [] for name in engines}
        with torch.inference_mode():
            for c in engines.values():
                for i, p in enumerate(prompts):
                    c.add(GenerateRequest(rid=str(i), input_ids=p, params=params))
                c.step()  # the prefill
                for _ in range(5):
                    c.step()
            with progress(reps * len(engines), "decode: tier on / off", "run") as bar:
                for _ in range(reps):
                    for name, c in engines.items():
                        t0 = time.perf_counter()
                        for _ in range(steps):
                            c.step()
                        step_times[name].append((time.perf_counter() - t0) / steps)
                        bar.update()
        for c in engines.values():
            c.close()
    on, off = statistics.median(step_times["tier on"]), statistics.median(step_times["tier off"])
    print(f"decode: batch {batch}, {steps} steps x {reps} alternations")
    print(f"  step p50 tier off {off * 1e3:.2f} ms, tier on (idle) {on * 1e3:.2f} ms")
    print(f"  on / off = {on / off:.3f}  (target <= 1.03)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["all", "restart-ttft", "capacity", "decode"])
    parser.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--prefix-len", type=int, default=1200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=20)
    ns = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    if ns.scenario in ("all", "restart-ttft"):
        restart_ttft(ns.model_path, ns.prefix_len, ns.reps)
    if ns.scenario in ("all", "capacity"):
        capacity(ns.model_path, ns.num_prompts, ns.prompt_len, ns.pool, ns.rounds, ns.batch)
    if ns.scenario in ("all", "decode"):
        decode(ns.model_path, ns.decode_batch, ns.decode_steps, ns.reps)


if __name__ == "__main__":
    main()
