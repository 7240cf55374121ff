"""bfloat16 weights against float32: the same model in both dtypes over a fixed text set
(benchmarks/data/quality_texts.json: prose, chat, code, JSON, numbers, ...), every position
teacher-forced (each text is one prefill, with logits at every position).

Prints the greedy top-1 agreement (the share of positions where both dtypes' argmax is the
same token), and the absolute difference of the log-probabilities both give to the float32
model's greedy token and to the text's own next token (max and mean), overall and per kind of
text; and the forwards' time in each dtype (taken in turns, text by text).

python benchmarks/bench_bf16_quality.py                    # the embedded SmolLM2-135M-Instruct
python benchmarks/bench_bf16_quality.py --model-path DIR --limit 10
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import torch

from radixlm.core.plan import ScheduledSeq
from radixlm.models.default import default_model_path
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner
from radixlm.tokenizer import Tokenizer
from radixlm.utils import progress

TEXTS = Path(__file__).parent / "data" / "quality_texts.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--limit", type=int, default=None, help="only the first N texts")
    args = p.parse_args()
    model_path = args.model_path or default_model_path()
    texts = json.loads(TEXTS.read_text())[: args.limit]
    tokenizer = Tokenizer.load(model_path)
    ids = [tokenizer.encode(t["text"]) for t in texts]
    config, weights = load_model_files(model_path)
    cpu = torch.device("cpu")
    slots = max(len(i) for i in ids) + 1
    runners = {
        name: ModelRunner(config, weights, cpu, dtype, slots) for name, dtype in DTYPES.items()
    }
    del weights
    print(
        f"bfloat16 vs float32: {len(texts)} texts, {sum(map(len, ids))} positions, "
        f"backends {', '.join(f'{n} {r.backend.name}' for n, r in runners.items())}"
    )

    for runner in runners.values():  # untimed: the first forward's one-time costs
        runner.forward([ScheduledSeq(ids[0], 0, torch.arange(1, len(ids[0]) + 1), 0)])
    seconds: dict[str, float] = defaultdict(float)
    # Per position, per kind: top-1 agreement, |dlogprob| of float32's greedy token and of the
    # text's next token (the last position has none).
    agree: dict[str, list[torch.Tensor]] = defaultdict(list)
    greedy_diff: dict[str, list[torch.Tensor]] = defaultdict(list)
    text_diff: dict[str, list[torch.Tensor]] = defaultdict(list)
    with progress(len(texts), "float32 / bfloat16", "text") as bar:
        for text, tokens in zip(texts, ids, strict=True):
            logprobs = {}
            for name, runner in runners.items():
                seq = ScheduledSeq(tokens, 0, torch.arange(1, len(tokens) + 1), 0)
                t0 = time.perf_counter()
                logits = runner.forward([seq])
                seconds[name] += time.perf_counter() - t0
                logprobs[name] = torch.log_softmax(logits.float(), dim=-1)
            full, half = logprobs["float32"], logprobs["bfloat16"]
            best = full.argmax(-1)
            following = torch.tensor(tokens[1:])[:, None]
            for kind in (text["kind"], "all"):
                agree[kind].append(best == half.argmax(-1))
                greedy_diff[kind].append(
                    (full.gather(1, best[:, None]) - half.gather(1, best[:, None])).abs()[:, 0]
                )
                text_diff[kind].append(
                    (full[:-1].gather(1, following) - half[:-1].gather(1, following)).abs()[:, 0]
                )
            bar.update()

    print(
        f"{'texts':16s} {'positions':>9s} {'top-1 agree':>11s} "
        f"{'greedy |dlp| max':>16s} {'mean':>7s} {'text |dlp| max':>14s} {'mean':>7s}"
    )
    for kind in sorted(agree, key=lambda k: (k == "all", k)):
        a = torch.cat(agree[kind]).float()
        g, t = torch.cat(greedy_diff[kind]), torch.cat(text_diff[kind])
        print(
            f"{kind:16s} {len(a):9d} {a.mean().item():11.2%} {g.max().item():16.4f} "
            f"{g.mean().item():7.4f} {t.max().item():14.4f} {t.mean().item():7.4f}"
        )
    ratio = seconds["float32"] / seconds["bfloat16"]
    print(
        f"prefill time: float32 {seconds['float32']:.2f} s, bfloat16 {seconds['bfloat16']:.2f} s: "
        f"bfloat16 speedup {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
