"""Many questions about the same images on a random LLaVA scaled to a realistic vision-token
count (576 per image, LLaVA-1.5's): the radix cache on vs off, and the encoder-output cache's
share of the gain, as ratios measured in one run (configurations alternate each round).

python benchmarks/bench_images.py                      # 4 images x 16 questions, 2 rounds
python benchmarks/bench_images.py --images 2 --questions 4 --image-size 56 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import radixlm  # noqa: F401  (first: its OpenMP defaults apply only before torch loads)

# isort: split

import numpy as np
import torch

from radixlm.cache.encoder_cache import EncoderCache
from radixlm.engine.engine import Engine
from radixlm.models.default import default_model_path
from radixlm.models.gguf import convert_gguf
from radixlm.utils import progress

QUESTIONS = [
    "What is in the picture?",
    "What colour dominates?",
    "How many objects are there?",
    "Is it day or night?",
    "Describe the background.",
    "What is the mood?",
    "Where could this be?",
    "Is anyone there?",
]


def write_model(path: Path, args: argparse.Namespace) -> Path:
    """A random LLaVA folder made by transformers (CLIP tower, Llama LM), the SmolLM2 tokenizer
    with an `<image>` token, and a CLIP image processor."""
    import transformers
    from tokenizers import Tokenizer

    tokenizer_files = convert_gguf(default_model_path(), weights=False)
    tok = Tokenizer.from_file(str(tokenizer_files / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_bytes(
        (tokenizer_files / "tokenizer_config.json").read_bytes()
    )
    size, patch = args.image_size, args.patch_size
    vision = transformers.CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(args.vision_hidden // 64, 1),
        image_size=size,
        patch_size=patch,
    )
    text = transformers.LlamaConfig(
        vocab_size=tok.token_to_id("<image>") + 1,
        hidden_size=args.lm_hidden,
        intermediate_size=4 * args.lm_hidden,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=max(args.lm_hidden // 64, 1),
        max_position_embeddings=4096,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.token_to_id("<image>"),
        image_seq_length=(size // patch) ** 2,
    )
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(path)
    return path


def write_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def run(engine: Engine, images: list[str], questions: int, output_len: int) -> tuple[float, int]:
    """Every (image, question) request at once; the wall time and the prompt tokens cached."""
    prompts, image_data = [], []
    for q in range(questions):
        for image in images:
            prompts.append(f"<image>\nQuestion {q}: {QUESTIONS[q % len(QUESTIONS)]}\nAnswer:")
            image_data.append(image)
    params = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, image_data=image_data)
    elapsed = time.perf_counter() - t0
    assert isinstance(outs, list)
    return elapsed, sum(o["meta_info"]["cached_tokens"] for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--questions", type=int, default=16, help="questions per image")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--lm-hidden", type=int, default=256)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-total-tokens", type=int, default=16384)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp), args)
        images = write_images(Path(tmp), args.images)
        kw: dict[str, Any] = {"max_total_tokens": args.max_total_tokens, "random_seed": 0}
        engines = {
            "radix on": Engine(str(folder), **kw),
            "radix off": Engine(str(folder), disable_radix_cache=True, **kw),
        }
        spec = engines["radix on"].info.image
        assert spec is not None
        n = args.images * args.questions
        print(
            f"{args.images} images x {args.questions} questions = {n} requests, "
            f"{spec.num_tokens} tokens per image, {args.output_len} output tokens each"
        )
        # (name, engine, encoder cache on)
        configs = [
            ("radix on,  encoder cache on ", "radix on", True),
            ("radix off, encoder cache on ", "radix off", True),
            ("radix off, encoder cache off", "radix off", False),
        ]
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        encoded: dict[str, int] = {}
        run(engines["radix on"], images[:1], 1, 1)  # warm-up: kernels, first allocations
        with progress(args.rounds * len(configs), "radix / encoder cache", "run") as bar:
            for _ in range(args.rounds):
                for name, which, encoder_cache in configs:
                    engine = engines[which]
                    engine.flush_cache()
                    model: Any = engine.core.runner.model
                    model.encoder_cache = EncoderCache() if encoder_cache else EncoderCache(0)
                    before = model.images_encoded
                    elapsed, cached = run(engine, images, args.questions, args.output_len)
                    times[name].append(elapsed)
                    encoded[name] = model.images_encoded - before
                    bar.write(
                        f"  {name}: {elapsed:6.2f} s, {n / elapsed:6.2f} req/s, "
                        f"{cached} prompt tokens cached, vision tower runs {encoded[name]}"
                    )
                    bar.update()
        for engine in engines.values():
            engine.shutdown()
    best = {name: min(t) for name, t in times.items()}
    on, off_enc, off = (best[name] for name, _, _ in configs)
    print(f"throughput radix on / off (both caches off) = {off / on:.2f}x (target >= 5x)")
    print(f"throughput radix on / off (encoder cache on) = {off_enc / on:.2f}x")
    print(
        f"encoder cache alone: {off / off_enc:.2f}x; its share of the gain = "
        f"{100 * (off - off_enc) / max(off - on, 1e-9):.1f}%"
    )
    print(
        f"(median times: {', '.join(f'{k.strip()} {statistics.median(v):.2f} s' for k, v in times.items())})"
    )


if __name__ == "__main__":
    main()
