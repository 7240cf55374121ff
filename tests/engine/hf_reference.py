"""The reference for engine tests: SmolLM2 as Hugging Face transformers loads it from the GGUF.

A plain module, not a conftest: tests import `conftest` from tests/ for the tiny-model helpers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_model


def load_hf_smollm2(config: pytest.Config, smollm2_path: str) -> Any:
    """transformers' LlamaForCausalLM with the weights transformers itself dequantized from the GGUF.

    Loading the GGUF takes transformers ~50 s (it parses the 49k-token vocabulary twice), so its
    own save_pretrained of the result is kept in pytest's cache; radixlm never touches those files,
    so the reference stays independent of radixlm's GGUF reader.
    """
    transformers = pytest.importorskip("transformers")
    gguf = Path(smollm2_path)
    key = f"{gguf.name}:{gguf.stat().st_size}:{transformers.__version__}"
    name = "hf-reference-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir(name) if cache is not None else None
    if folder is not None and (folder / "complete").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if folder is not None:
            # save_pretrained refuses a model loaded from a GGUF; its tensors and config are plain.
            config_dict = model.config.to_dict()
            config_dict.pop("quantization_config", None)
            (folder / "config.json").write_text(json.dumps(config_dict))
            save_model(model, str(folder / "model.safetensors"))  # handles the tied embeddings
            (folder / "complete").touch()  # last, so an interrupted save is redone
    return model.eval()


@dataclass(frozen=True)
class Greedy:
    """A reference greedy continuation and how safe it is to compare against."""

    ids: list[int]
    min_margin: float  # smallest gap between the best and second-best logit along the way


@torch.inference_mode()
def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> Greedy:
    """transformers' greedy continuation (no stop tokens: the caller cuts at eos)."""
    past = None
    x = torch.tensor([prompt_ids])
    ids: list[int] = []
    margin = float("inf")
    for _ in range(max_new_tokens):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        past = out.past_key_values
        top2 = out.logits[0, -1].float().topk(2)
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        ids.append(int(top2.indices[0]))
        x = torch.tensor([[ids[-1]]])
    return Greedy(ids, margin)


@torch.inference_mode()
def hf_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over `ids` in one forward: row i predicts ids[i + 1]."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def cut_at_eos(ids: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """The prefix of ids up to and including the first eos, as the engine would stop."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids
