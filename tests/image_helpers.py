"""Test images for the multimodal tests (a module of its own: each test folder's conftest
shadows tests/conftest.py): tiny random LLaVA folders and random images."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixlm.models.default import default_model_path
from radixlm.models.gguf import convert_gguf


def write_test_image(
    path: Path, size: tuple[int, int], seed: int, levels: tuple[int, int] = (0, 256)
) -> Path:
    """A random RGB PNG of `size` (width, height), its values drawn from [levels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(*levels, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_tiny_llava(
    path: Path,
    tower: str = "clip",
    image_size: int = 56,
    patch_size: int = 14,
    seed: int = 0,
    **llava_overrides: Any,
) -> Path:
    """A tiny random LLaVA folder made by transformers itself (LlavaConfig over small CLIP or
    SigLIP and Llama configs): weights, config, the SmolLM2 tokenizer with an `<image>` token
    added, and the tower's image processor config."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer_files = convert_gguf(default_model_path(), weights=False)
    tok = HFTokenizer.from_file(str(tokenizer_files / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    image_token = tok.token_to_id("<image>")
    tok.save(str(path / "tokenizer.json"))
    shutil.copy(tokenizer_files / "tokenizer_config.json", path / "tokenizer_config.json")
    vision_kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if tower == "clip":
        vision = transformers.CLIPVisionConfig(**vision_kw)
        processor: Any = transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        strategy = llava_overrides.pop("vision_feature_select_strategy", "default")
    else:
        vision = transformers.SiglipVisionConfig(**vision_kw)
        processor = transformers.SiglipImageProcessor(
            size={"height": image_size, "width": image_size}
        )
        strategy = llava_overrides.pop("vision_feature_select_strategy", "full")
    text = transformers.LlamaConfig(
        vocab_size=image_token + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    patches = (image_size // patch_size) ** 2
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_select_strategy=strategy,
        image_seq_length=patches + (tower == "clip" and strategy == "full"),
        **llava_overrides,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        # Wider logits than the init's: greedy choices far apart, so comparisons are decisive.
        model.lm_head.weight.mul_(30)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
