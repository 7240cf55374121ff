"""Frontend-language benchmarks: LM programs with the radix cache on vs off, measured in one run,
and the interpreter's own overhead.

    python benchmarks/bench_lang.py              # all three, default (CPU-sized) sizes
    python benchmarks/bench_lang.py --tot-programs 4 --context-words 1500 --fewshot-batch 32

- tree-of-thought: a long shared context, 4 plans (fork), 2 evaluations per plan (nested fork);
- few-shot: a k-shot prompt through run_batch (its common prefix is cached first);
- frontend overhead: the interpreter's own time per gen, on a backend that answers at once, and a
  one-token program against the same engine.generate call made directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import radixlm as sgl
from radixlm.engine.engine import Engine
from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.backends.engine import EngineBackend
from radixlm.lang.ir import GenParams
from radixlm.utils import progress

# run_batch's progress bars, on a terminal only (tests read the output).
BARS = sys.stderr.isatty()

TOPICS = ["the history of tea", "how bridges stay up", "why the sky is blue", "how bees make honey"]
SENTENCES = [
    "The committee met on a grey morning to review the harbour project.",
    "Engineers had measured the tides for three years before drawing the first plan.",
    "Each proposal was weighed against its cost, its risk and the time it would take.",
    "Local fishermen asked that the old pier be kept open during the works.",
    "A storm in the second winter delayed the delivery of the steel beams.",
    "The final report praised the team for finishing close to the original budget.",
]


def long_context(words: int) -> str:
    """A deterministic document of about `words` words."""
    out: list[str] = []
    i = 0
    while sum(len(s.split()) for s in out) < words:
        out.append(f"({i}) " + SENTENCES[i % len(SENTENCES)])
        i += 1
    return " ".join(out)


@sgl.function
def tree_of_thought(s, context, question):
    s += "Read the report and answer the question.\n\nReport: " + context + "\n\n"
    s += "Question: " + question + "\n"
    plans = s.fork(4)
    plans += lambda i: f"Plan {i + 1}:" + sgl.gen("plan", max_tokens=12, ignore_eos=True) + "\n"
    # fork() waits for its state: fork every plan first, then wait, so the plans run concurrently.
    evals = [plan.fork(2) for plan in plans]
    for group in evals:
        group += lambda j: (
            f"Evaluation {j + 1} of plan:" + sgl.gen("eval", max_tokens=6, ignore_eos=True)
        )
    for group in evals:
        group.join()
    plans.join()


def few_shot_program(shots: int) -> Any:
    examples = "".join(
        f"Q: What is {a} plus {a + 1}?\nA: {2 * a + 1}\n" for a in range(1, shots + 1)
    )

    @sgl.function
    def few_shot(s, question):
        s += "Answer the arithmetic questions.\n" + examples
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, ignore_eos=True)

    return few_shot


def bench_cache(args: argparse.Namespace) -> None:
    context = long_context(args.context_words)
    tot_batch = [{"context": context, "question": f"How would you explain {t}?"} for t in TOPICS]
    tot_batch = (tot_batch * args.tot_programs)[: args.tot_programs]
    few_shot = few_shot_program(args.shots)
    fs_batch = [{"question": f"What is {100 + i} plus {7 * i}?"} for i in range(args.fewshot_batch)]
    times: dict[tuple[str, str], float] = {}
    for label, disable in (("on", False), ("off", True)):
        with Engine(args.model_path, disable_radix_cache=disable, random_seed=0) as engine:
            backend = EngineBackend(engine)
            few_shot.run(question="What is 1 plus 1?", backend=backend, temperature=0)  # warm-up
            engine.flush_cache()
            t0 = time.perf_counter()
            states = tree_of_thought.run_batch(
                tot_batch, backend=backend, temperature=0, progress_bar=BARS
            )
            times["tot", label] = time.perf_counter() - t0
            assert all(s.error() is None for s in states), [s.error() for s in states]
            prompt_tokens = len(engine.tokenizer.encode(states[0].text()))
            engine.flush_cache()
            t0 = time.perf_counter()
            states = few_shot.run_batch(fs_batch, backend=backend, temperature=0, progress_bar=BARS)
            times["few", label] = time.perf_counter() - t0
            assert all(s.error() is None for s in states)
            fs_tokens = len(engine.tokenizer.encode(states[0].text()))
    print(
        f"tree-of-thought: {len(tot_batch)} programs x (4 plans x 2 evaluations), "
        f"shared context ~{prompt_tokens} tokens"
    )
    print(
        f"  cache on {times['tot', 'on']:.1f} s, off {times['tot', 'off']:.1f} s, "
        f"speedup {times['tot', 'off'] / times['tot', 'on']:.2f}x"
    )
    print(
        f"few-shot run_batch: {len(fs_batch)} programs, {args.shots} shots (~{fs_tokens} tokens each)"
    )
    print(
        f"  cache on {times['few', 'on']:.1f} s, off {times['few', 'off']:.1f} s, "
        f"speedup {times['few', 'off'] / times['few', 'on']:.2f}x"
    )


class InstantBackend(Backend):
    """Answers every gen at once: what remains is the interpreter's own time."""

    def generate(self, prompt: Prompt, params: GenParams) -> tuple[str, dict[str, Any]]:
        return "x", {}


def bench_overhead(args: argparse.Namespace) -> None:
    @sgl.function
    def many_gens(s, n):
        for i in range(n):
            s += f"Step {i}:" + sgl.gen(f"g{i}", max_tokens=1) + "\n"

    @sgl.function
    def one_gen(s):
        s += "The capital of France is" + sgl.gen("x", max_tokens=1)

    instant = InstantBackend()
    n = 2000
    many_gens.run(n=10, backend=instant)
    t0 = time.perf_counter()
    many_gens.run(n=n, backend=instant)
    per_gen_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(200):
        one_gen.run(backend=instant)
    per_run_us = (time.perf_counter() - t0) / 200 * 1e6
    print(
        f"frontend overhead (no model): {per_gen_us:.0f} us per gen, {per_run_us:.0f} us per one-gen run()"
    )

    with Engine(args.model_path, random_seed=0) as engine:
        backend = EngineBackend(engine)
        params = {"max_new_tokens": 1, "temperature": 0}
        direct: list[float] = []
        program: list[float] = []
        calls = [
            (direct, lambda: engine.generate("The capital of France is", params)),
            (program, lambda: one_gen.run(backend=backend, temperature=0)),
        ]
        with progress(args.overhead_reps, "program vs direct call", "pair") as bar:
            for rep in range(args.overhead_reps):
                for times, call in calls[:: 1 if rep % 2 else -1]:  # alternate the first
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                bar.update()
    # The minimum: the machine's other load only ever adds time.
    d, p = min(direct), min(program)
    print(
        f"one-token program vs direct Engine.generate (best of {args.overhead_reps}): "
        f"{p * 1e3:.1f} ms vs {d * 1e3:.1f} ms, overhead {(p - d) * 1e3:.2f} ms per call"
    )


def main() -> None:
    """Parse the sizes and run the benchmarks."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument(
        "--tot-programs", type=int, default=2, help="tree-of-thought programs in the batch"
    )
    parser.add_argument("--context-words", type=int, default=400, help="words of shared context")
    parser.add_argument(
        "--fewshot-batch", type=int, default=12, help="few-shot programs in the batch"
    )
    parser.add_argument("--shots", type=int, default=16, help="examples in the few-shot prompt")
    parser.add_argument(
        "--overhead-reps", type=int, default=30, help="repetitions of the overhead test"
    )
    parser.add_argument("--only", choices=["cache", "overhead"], help="run one part only")
    args = parser.parse_args()
    if args.only in (None, "cache"):
        bench_cache(args)
    if args.only in (None, "overhead"):
        bench_overhead(args)


if __name__ == "__main__":
    main()
