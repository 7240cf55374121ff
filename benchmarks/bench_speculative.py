"""Speculative decoding without a draft model: decode tokens/s with vs without drafts, as ratios
measured in one run (runs with and without drafts alternate on one engine), with acceptance
lengths and what the measured step cost makes of the two runs.

python benchmarks/bench_speculative.py                       # cases (a)-(d), --algorithm both
python benchmarks/bench_speculative.py --algorithm ngram     # one draft source only

(a) input-grounded output: quote or edit a given text, code with repeated identifiers
(b) the same program run twice: the second run, measured, drafts from the radix tree
(c) free-form text with little repetition
(d) free-form text at batch 32 (drafting switches itself off)

and, first, the decode step cost by rows that the engine measured at start (what it allots
draft tokens by, radixlm/speculative/cost.py), and the cost of a step by the rows it verifies
(batch x (1 + draft)) relative to one row, timed here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch

from radixlm.core.messages import GenerateRequest, SpecCounters
from radixlm.core.params import SamplingParams
from radixlm.core.plan import ScheduledSeq
from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.speculative.cost import StepCost
from radixlm.speculative.speculator import Speculator
from radixlm.utils import progress

GROUNDED = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Fix the spelling mistakes in this text and write it out again in full:\n\n{text}",
    "Rewrite this Python function with the variable `total_count` renamed to `n`, "
    "and write the whole function:\n\n{code}",
    "Add a docstring to this function and output the whole function:\n\n{code}",
]
TEXT = (
    "The radix tree keeps every cached prefix of every request. When a new request arrives, "
    "the scheduler matches its tokens against the tree, locks the longest cached prefix, and "
    "computes only the rest. Finished requests are inserted back, so the next turn of the "
    "same conversation finds its history already computed."
)
TEXT_TYPOS = TEXT.replace("request", "reqeust").replace("tree", "tre").replace("the ", "teh ")
CODE = (
    "def count_words(lines):\n"
    "    total_count = 0\n"
    "    for line in lines:\n"
    "        words = line.split()\n"
    "        total_count = total_count + len(words)\n"
    "    if total_count > 100:\n"
    "        print('many words:', total_count)\n"
    "    return total_count\n"
)
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three surprising facts about octopuses?",
    "Describe your ideal weekend in a few sentences.",
    "Give advice to someone starting to learn the piano as an adult.",
    "Explain why the sky is blue to a ten-year-old.",
    "Invent a new holiday and describe how people celebrate it.",
    "What would you pack for a week-long hiking trip, and why?",
    "Write a letter from a cat to its owner.",
]


def chat(core: EngineCore, text: str) -> list[int]:
    """The prompt's token ids in the model's chat template."""
    rendered = core.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return core.tokenizer.encode(rendered)


def grounded(core: EngineCore, n: int) -> list[list[int]]:
    """n input-grounded prompts."""
    texts = [
        GROUNDED[0].format(text=TEXT),
        GROUNDED[1].format(text=TEXT_TYPOS),
        GROUNDED[2].format(code=CODE),
        GROUNDED[3].format(code=CODE),
    ]
    return [chat(core, texts[i % len(texts)]) for i in range(n)]


def free(core: EngineCore, n: int, offset: int = 0) -> list[list[int]]:
    """n free-form prompts (distinct while n <= len(FREE), then suffixed)."""
    out = []
    for i in range(n):
        j = offset + i
        suffix = "" if j < len(FREE) else f" (variation {j // len(FREE)})"
        out.append(chat(core, FREE[j % len(FREE)] + suffix))
    return out


def decode(core: EngineCore, prompts: list[list[int]], max_new: int) -> tuple[int, float, int]:
    """Run prompts greedily to the end; (tokens generated after each request's first, seconds
    and steps from the step after the last first token to the end): decode throughput, prefill
    left out."""
    for i, ids in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new)
        core.add(GenerateRequest(rid=f"q{i}", input_ids=ids, params=params))
    started: set[str] = set()
    tokens, t0, steps = 0, 0.0, 0
    with torch.inference_mode():
        while core.has_work:
            outs = core.step()
            steps += bool(t0)
            for o in outs:
                if o.rid in started:
                    tokens += len(o.new_ids)
                elif o.new_ids:
                    started.add(o.rid)
                    tokens += len(o.new_ids) - 1
            if len(started) == len(prompts) and not t0:
                t0, tokens = time.perf_counter(), 0
    core.check_invariant()
    return tokens, time.perf_counter() - t0, steps


def drafting(core: EngineCore, speculator: Speculator, on: bool) -> None:
    """Turn core's speculative decoding on or off between runs: its scheduler proposes drafts
    and the radix tree indexes its new leaves for them (the suffix index) only while on."""
    core.scheduler.speculator = speculator if on else None
    index = speculator.suffix
    core.cache.on_new_leaf = index.add if on and index is not None else None


def spec_delta(
    before: dict[str, SpecCounters], after: dict[str, SpecCounters]
) -> dict[str, SpecCounters]:
    """The counters per draft source between two stats."""
    out = {}
    for name, c in after.items():
        b = before.get(name, SpecCounters())
        out[name] = SpecCounters(
            c.drafted - b.drafted, c.accepted - b.accepted, c.verified - b.verified
        )
    return out


def describe(delta: dict[str, SpecCounters]) -> str:
    """Drafted / accepted tokens and acceptance length per source."""
    parts = [
        f"{name}: {d.accepted}/{d.drafted} accepted, accept length {d.accept_length:.2f}"
        for name, d in delta.items()
        if d.verified
    ]
    return "; ".join(parts) or "no drafts"


@dataclass(frozen=True)
class Run:
    """One decode run: tokens after each request's first, seconds and steps (decode()), and
    the draft tokens it rejected."""

    tokens: int
    seconds: float
    steps: int
    rejected: int = 0


def modelled(cost: StepCost, off: Run, on: Run) -> str:
    """What the step cost (a line: seconds = a + b x rows, as refit so far) says of the runs: the
    on / off ratio it predicts, and the ratio of the same on run without its rejected draft
    rows (its steps and accepted tokens kept). A closed batch lasts at least as many steps as
    its least draftable request needs, so better drafts for the others cannot beat that
    second figure; only fewer steps for that request can."""
    b = (cost(cost.max_rows) - cost(1)) / max(1, cost.max_rows - 1)
    a = cost(1) - b

    def seconds(run: Run, rows: int) -> float:
        return run.steps * a + rows * b

    off_time = seconds(off, off.tokens)
    return (
        f"step cost model: on / off {off_time / seconds(on, on.tokens + on.rejected):.2f}x, "
        f"without the rejected draft rows {off_time / seconds(on, on.tokens):.2f}x"
    )


def row_costs(core: EngineCore, shapes: list[tuple[int, int]], reps: int) -> None:
    """Forward time of decode steps of `batch` rows of `tokens` each (a 200-token context),
    each relative to one row of one token; shapes alternate, the minimum of reps is kept. The
    rows' slots are the pool's (taken from the allocator, given back at the end)."""
    ctx = 200
    most_rows, most_tokens = max(b for b, _ in shapes), max(t for _, t in shapes)
    slots = core.allocator.alloc(most_rows * (ctx + most_tokens))
    if slots is None:
        raise SystemExit(
            f"--max-total-tokens holds {core.allocator.num_free} free slots; the row costs "
            f"need {most_rows * (ctx + most_tokens)}"
        )
    rows = slots.view(most_rows, ctx + most_tokens)

    def seqs(batch: int, tokens: int) -> list[ScheduledSeq]:
        return [
            ScheduledSeq(list(range(100, 100 + tokens)), ctx, rows[i, : ctx + tokens], ctx)
            for i in range(batch)
        ]

    times: dict[tuple[int, int], list[float]] = {s: [] for s in [(1, 1), *shapes]}
    with torch.inference_mode(), progress(reps, "row costs", "round") as bar:
        for _ in range(reps):
            for shape in times:
                batch = seqs(*shape)
                t0 = time.perf_counter()
                core.runner.forward(batch)
                times[shape].append(time.perf_counter() - t0)
            bar.update()
    one = min(times[(1, 1)])
    print(f"decode step, 1 row: {one * 1000:.1f} ms; relative cost by batch x tokens:")
    print("  " + ", ".join(f"{b}x{t} {min(times[(b, t)]) / one:.2f}" for b, t in shapes))
    core.allocator.free(slots)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--algorithm", default="both", choices=["ngram", "radix", "both"])
    p.add_argument("--num-draft-tokens", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batches", default="1,4", help="batch sizes of cases (a)-(c)")
    p.add_argument("--large-batch", type=int, default=32, help="batch size of case (d)")
    p.add_argument("--cases", default="abcd", help="which of the cases (a)-(d) to run")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two engines")
    p.add_argument("--max-total-tokens", type=int, default=12288)
    p.add_argument(
        "--row-reps", type=int, default=8, help="repeats of the row-cost timing (0: none)"
    )
    args = p.parse_args()

    core = EngineCore(
        EngineArgs(
            model_path=args.model_path,
            max_total_tokens=args.max_total_tokens,
            random_seed=0,
            speculative_algorithm=args.algorithm,
            speculative_num_draft_tokens=args.num_draft_tokens,
        )
    )
    # One engine, with drafting on or off (`drafting`): both run on the same weights, pool and
    # kernels (two engines in one process differed by a few percent on their own, by where
    # their memory landed).
    speculator = core.speculator
    assert speculator is not None
    batches = [int(b) for b in args.batches.split(",")]
    cases: list[tuple[str, int]] = [(c, b) for c in "abc" if c in args.cases for b in batches]
    if "d" in args.cases:
        cases.append(("d", args.large_batch))
    print(f"model {core.model_path}, algorithm {args.algorithm}, {args.rounds} rounds")
    print(f"step cost measured at start, ms by rows: {speculator.cost.describe()}")
    shapes = [(1, 2), (1, 4), (1, 5), (1, 8), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (16, 1)]
    if args.row_reps:
        row_costs(core, shapes, args.row_reps)
    with progress(len(cases) * args.rounds * 2, "drafts off / on", "run") as bar:
        for case, batch in cases:
            ratios: list[float] = []
            rates: list[tuple[float, float]] = []
            accept = ""
            for r in range(args.rounds):
                runs: dict[bool, Run] = {}
                for drafts in (False, True) if r % 2 == 0 else (True, False):
                    core.scheduler.flush_cache()
                    drafting(core, speculator, drafts)
                    if case == "a":
                        prompts = grounded(core, batch)
                    elif case == "b":
                        prompts = free(core, batch, offset=r)
                        decode(core, prompts, args.max_new_tokens)  # the first run fills the tree
                    else:
                        prompts = free(core, batch, offset=r)
                    before = core.stats().spec
                    run = Run(*decode(core, prompts, args.max_new_tokens))
                    if drafts:
                        delta = spec_delta(before, core.stats().spec)
                        accept = describe(delta)
                        rejected = sum(d.drafted - d.accepted for d in delta.values())
                        run = replace(run, rejected=rejected)
                    runs[drafts] = run
                    bar.update()
                off_run, on_run = runs[False], runs[True]
                rates.append((off_run.tokens / off_run.seconds, on_run.tokens / on_run.seconds))
                ratios.append(rates[-1][1] / rates[-1][0])
            off_rate = statistics.median(x for x, _ in rates)
            on_rate = statistics.median(y for _, y in rates)
            bar.write(
                f"({case}) batch {batch:2d}: off {off_rate:6.1f} tok/s, on {on_rate:6.1f} tok/s, "
                f"on / off = {statistics.median(ratios):.2f}x "
                f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}); last round {accept}; "
                f"decode steps off {off_run.steps}, on {on_run.steps}; "
                f"{modelled(speculator.cost, off_run, on_run)}"
            )
            sys.stdout.flush()
    drafting(core, speculator, True)
    if speculator.cost_fit is not None:
        print(
            f"step cost refit from {speculator.cost_fit.observed} decode steps with drafting on, "
            f"ms by rows: {speculator.cost.describe()}"
        )


if __name__ == "__main__":
    main()
