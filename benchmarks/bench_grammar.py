"""Structured-output benchmarks: jump-forward and the grammar work per step, as ratios measured
in one run.

python benchmarks/bench_grammar.py all
python benchmarks/bench_grammar.py jump-forward  # JSON extraction: passes and throughput, on vs off
python benchmarks/bench_grammar.py overhead      # grammar work per decode step at batch 32
python benchmarks/bench_grammar.py closing       # JSON cut by a tight max_new_tokens: closing on vs off
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch
from plots import add_plot_arg, bar_charts  # benchmarks/plots.py

from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.core.plan import StepPlan
from radixlm.core.request import Req
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.engine.engine import Engine
from radixlm.grammar.manager import GrammarManager
from radixlm.grammar.state import GrammarState
from radixlm.sampling import SamplingBatch
from radixlm.utils import progress

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NAMES = [
    "Alice Martin",
    "Bob Chen",
    "Carla Diaz",
    "Deepak Rao",
    "Emma Wilson",
    "Farid Haddad",
    "Grace Kim",
    "Hugo Laurent",
    "Ines Costa",
    "Jonas Berg",
    "Keiko Sato",
    "Liam Walsh",
]
CITIES = [
    "Paris",
    "Toronto",
    "Madrid",
    "Mumbai",
    "London",
    "Beirut",
    "Seoul",
    "Lyon",
    "Lisbon",
    "Oslo",
    "Osaka",
    "Dublin",
]


def prompts(tokenizer: Any, n: int) -> list[str]:
    """n extraction prompts, each naming a person, an age and a city, in the chat template."""
    out = []
    for i in range(n):
        name, city, age = NAMES[i % len(NAMES)], CITIES[(i * 5) % len(CITIES)], 19 + (i * 7) % 60
        text = (
            f"Extract the person as JSON with keys name, age and city: {name} is {age} years "
            f"old and lives in {city}."
        )
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return out


def params(max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, "json_schema": SCHEMA, **extra}


def passes(engine: Engine) -> int:
    return int(engine.get_stats()["num_forward_passes"])


def bench_jump_forward(args: argparse.Namespace) -> None:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(
        f"JSON extraction: {args.prompts} prompts, schema {{name, age, city}}, greedy; "
        f"concurrency {concurrency} (1: the first {args.sequential} prompts one at a time)"
    )
    with (
        Engine(args.model_path) as on,
        Engine(args.model_path, disable_jump_forward=True) as off,
    ):
        engines = {True: on, False: off}
        texts = prompts(on.tokenizer, args.prompts)
        for eng in engines.values():
            eng.generate(texts[0], params(args.max_new_tokens))  # builds llguidance, caches it
        outputs: dict[bool, list[str]] = {}
        figure: dict[str, dict[str, list[float]]] = {"req/s": {}, "passes": {}}
        bar = progress(len(concurrency) * args.rounds * 2, "jump-forward on / off", "run")
        for c in concurrency:
            batch = texts[: args.sequential] if c == 1 else texts
            walls: dict[bool, float] = {True: float("inf"), False: float("inf")}
            counts: dict[bool, int] = {}
            # Rounds alternate on-off and off-on, back to back, so both see the same machine
            # load; each mode keeps its best wall time.
            for r in range(args.rounds):
                for jump in (True, False) if r % 2 == 0 else (False, True):
                    eng = engines[jump]
                    eng.flush_cache()
                    before = passes(eng)
                    t0 = time.perf_counter()
                    outs = _run(eng, batch, c, args.max_new_tokens)
                    walls[jump] = min(walls[jump], time.perf_counter() - t0)
                    counts[jump] = passes(eng) - before
                    outputs[jump] = [o["text"] for o in outs]
                    bar.update()
            for jump in (True, False):
                mode = f"jump-forward {'on' if jump else 'off'}"
                figure["req/s"].setdefault(mode, []).append(len(batch) / walls[jump])
                figure["passes"].setdefault(mode, []).append(counts[jump] / len(batch))
                valid = sum(_valid(t) for t in outputs[jump])
                per_request = f"{counts[jump] / len(batch):5.1f} per request, " if c == 1 else ""
                bar.write(
                    f"  concurrency {c:2d}, jump-forward {'on ' if jump else 'off'}: "
                    f"{counts[jump]:4d} forward passes ({per_request}{len(batch)} requests), "
                    f"{walls[jump]:6.2f}s, {len(batch) / walls[jump]:5.2f} req/s, "
                    f"{valid}/{len(batch)} valid JSON"
                )
            bar.write(
                f"  concurrency {c:2d}: {1 - counts[True] / counts[False]:.0%} fewer forward "
                f"passes (target >= 40%), throughput on / off = {walls[False] / walls[True]:.2f}x "
                "(target >= 1.3x)"
            )
        bar.close()
        same = sum(a == b for a, b in zip(outputs[True], outputs[False], strict=True))
        print(
            f"  identical greedy texts with and without jump-forward: {same}/{len(outputs[True])}"
        )
    if args.plot:
        bar_charts(
            args.plot,
            "jump_forward",
            "JSON extraction (schema {name, age, city}), greedy: jump-forward on vs off",
            [f"concurrency {c}" for c in concurrency],
            [
                ("requests/s (best round)", figure["req/s"]),
                ("forward passes per request", figure["passes"]),
            ],
        )


def _run(
    engine: Engine, texts: list[str], concurrency: int, max_new_tokens: int, **extra: Any
) -> list[Any]:
    """Generate for every text, at most `concurrency` requests in flight (clients in threads)."""
    p = params(max_new_tokens, **extra)
    if concurrency >= len(texts):
        outs = engine.generate(texts, p)
        assert isinstance(outs, list)
        return outs
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda t: engine.generate(t, p), texts))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _valid(text: str) -> bool:
    if not _parses(text):
        return False
    value = json.loads(text)
    return isinstance(value, dict) and set(value) == {"name", "age", "city"}


def bench_closing(args: argparse.Namespace) -> None:
    """The extraction workload cut by tight budgets, budget-aware closing on and off in turn on
    one engine (the parameter is per request); on/off order alternates between rounds."""
    budgets = [int(b) for b in args.tight_tokens.split(",")]
    print(
        f"JSON extraction cut short: {args.prompts} prompts, schema {{name, age, city}} (its "
        f"shortest document is 15 tokens, greedy outputs ~23), greedy; max_new_tokens {budgets}; "
        f"all at once, then the first {args.sequential} one at a time"
    )
    with Engine(args.model_path) as engine:
        texts = prompts(engine.tokenizer, args.prompts)
        engine.generate(texts[0], params(args.max_new_tokens))  # builds llguidance, caches it
        for budget in budgets:
            for concurrency in (len(texts), 1):
                batch = texts if concurrency > 1 else texts[: args.sequential]
                walls: dict[bool, float] = {True: float("inf"), False: float("inf")}
                outputs: dict[bool, list[Any]] = {}
                counts: dict[bool, int] = {}
                for r in range(args.rounds):
                    for close in (True, False) if r % 2 == 0 else (False, True):
                        engine.flush_cache()
                        before = passes(engine)
                        t0 = time.perf_counter()
                        outputs[close] = _run(
                            engine, batch, concurrency, budget, close_on_length=close
                        )
                        walls[close] = min(walls[close], time.perf_counter() - t0)
                        counts[close] = passes(engine) - before
                for close in (True, False):
                    outs = outputs[close]
                    texts_out = [o["text"] for o in outs]
                    lengths = sum(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
                    tokens = statistics.mean(o["meta_info"]["completion_tokens"] for o in outs)
                    timing = (
                        f"{len(batch) / walls[close]:5.2f} req/s"
                        if concurrency > 1
                        else f"{walls[close] / len(batch) * 1000:6.0f} ms/request"
                    )
                    print(
                        f"  max_new_tokens {budget}, {concurrency:2d} in flight, closing "
                        f"{'on ' if close else 'off'}: {sum(map(_parses, texts_out))}/{len(outs)} "
                        f"parse, {sum(map(_valid, texts_out))}/{len(outs)} have the 3 keys, "
                        f"{lengths} end by length, {tokens:4.1f} tokens each, "
                        f"{counts[close]} forward passes, {timing}"
                    )
                what = "throughput" if concurrency > 1 else "latency"
                print(
                    f"  max_new_tokens {budget}, {concurrency:2d} in flight: {what} cost of "
                    f"closing, time on / off = {walls[True] / walls[False]:.3f}"
                )
    _closing_work(args, budgets)


def _closing_work(args: argparse.Namespace, budgets: list[int]) -> None:
    """The grammar's own time (masks, accept, jump-forward, closing checks) per request, all
    prompts at once, closing on and off: the part of a step that closing adds to."""
    core = EngineCore(EngineArgs(args.model_path))
    grammar = TimedGrammar(core.tokenizer, core.model_config.vocab_size)
    core.grammar = grammar
    ids = [
        core.tokenizer.encode(t, add_special_tokens=False)
        for t in prompts(core.tokenizer, args.prompts)
    ]
    for budget in budgets:
        seconds = {True: float("inf"), False: float("inf")}
        for r, close in enumerate((True, False, False, True)):  # best of two, both orders
            grammar.seconds = 0.0
            p = SamplingParams(
                max_new_tokens=budget,
                temperature=0,
                json_schema=json.dumps(SCHEMA),
                close_on_length=close,
            )
            for i, x in enumerate(ids):
                core.add(GenerateRequest(f"{budget}-{r}-{i}", x, p))
            with torch.inference_mode():
                while core.has_work:
                    core.step()
            seconds[close] = min(seconds[close], grammar.seconds / len(ids))
        print(
            f"  max_new_tokens {budget}: grammar work per request (masks, accept, jump, "
            f"closing) on {seconds[True] * 1000:.2f} ms, off {seconds[False] * 1000:.2f} ms"
        )


class TimedState(GrammarState):
    """A request's grammar state, adding the time its per-step work takes to a shared clock."""

    def __init__(self, clock: TimedGrammar, *args: Any) -> None:
        super().__init__(*args)
        self.clock = clock

    def settle(self, req: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        t0 = time.perf_counter()
        edit = super().settle(req, sampled, context_len)
        self.clock.seconds += time.perf_counter() - t0
        return edit


class TimedGrammar(GrammarManager):
    """The engine's grammar manager, timing the per-step work it and its states do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def new_state(self, compiled: Any, close: bool = False) -> GrammarState:
        closer = self.closer if close else None
        matcher = self.backend.matcher(compiled)
        return TimedState(self, matcher, self.backend, self.jump_forward, closer)

    def fill_masks(self, plan: StepPlan) -> torch.Tensor | None:
        t0 = time.perf_counter()
        masks = super().fill_masks(plan)
        self.seconds += time.perf_counter() - t0
        return masks


def bench_overhead(args: argparse.Namespace) -> None:
    b = args.batch
    for jump in (False, True):
        core = EngineCore(EngineArgs(args.model_path, disable_jump_forward=not jump))
        sched = core.scheduler
        grammar = TimedGrammar(core.tokenizer, core.model_config.vocab_size, jump_forward=jump)
        core.grammar = grammar
        texts = prompts(core.tokenizer, b)
        p = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=0, json_schema=json.dumps(SCHEMA)
        )
        for i, text in enumerate(texts):
            ids = core.tokenizer.encode(text, add_special_tokens=False)
            core.add(GenerateRequest(f"r{i}", ids, p))
        steps: list[tuple[float, float]] = []
        masks: torch.Tensor | None = None
        bar = progress(b, f"jump-forward {'on' if jump else 'off'}", "request")
        with torch.inference_mode(), bar:
            while core.has_work:
                decodes = sum(r.seq_len - r.kv_len == 1 for r in sched.running) == b
                grammar.seconds = 0.0
                t0 = time.perf_counter()
                core.step()
                if decodes:  # every row a one-token decode: the steady state
                    steps.append((time.perf_counter() - t0, grammar.seconds))
                    if len(sched.running) == b:  # the masks of a full batch, to time applying
                        states = [r.grammar for r in sched.running]
                        matchers = [s.matcher for s in states if isinstance(s, GrammarState)]
                        masks = grammar.backend.fill_masks(matchers)
                left = len(sched.waiting) + len(sched.running) + grammar.num_pending
                bar.update(b - left - bar.n)
        assert steps and masks is not None, "no decode step ran with the full batch"
        apply = _mask_apply_seconds(core, masks, args.repeat)
        step = statistics.median(s for s, _ in steps)
        work = statistics.median(g for _, g in steps) + apply
        print(
            f"grammar work per decode step, batch {b}, jump-forward {'on' if jump else 'off'} "
            f"({len(steps)} steps)"
        )
        print(
            f"  step {step * 1000:6.1f} ms; masks + accept {(work - apply) * 1000:5.2f} ms, "
            f"mask apply {apply * 1000:5.2f} ms: {work / step:.1%} of the step  (target <= 10%)"
        )


def _mask_apply_seconds(core: EngineCore, masks: torch.Tensor, repeat: int) -> float:
    """What the mask adds to sampling a [B, V] batch (greedy): with it minus without it."""
    b = masks.shape[0]
    logits = torch.randn(b, core.model_config.vocab_size)
    greedy = SamplingParams(temperature=0)
    batch = SamplingBatch([greedy] * b, [[]] * b, [[]] * b, [()] * b, [0] * b, [False] * b)
    masked = SamplingBatch([greedy] * b, [[]] * b, [[]] * b, [()] * b, [0] * b, [False] * b, masks)
    sampler = core.sampler

    def best(sb: SamplingBatch) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            sampler.sample(logits, sb)
            times.append(time.perf_counter() - t0)
        return min(times)

    return max(0.0, best(masked) - best(batch))


SCENARIOS = {
    "jump-forward": bench_jump_forward,
    "overhead": bench_overhead,
    "closing": bench_closing,
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--sequential", type=int, default=8, help="prompts run at concurrency 1")
    p.add_argument("--concurrency", default="1,8,48", help="requests in flight, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--tight-tokens",
        default="18,20,22",
        help="closing: max_new_tokens that cut, comma-separated",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="timed runs per mode (best kept)")
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
