"""Reading a model's config and weights from a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from radixlm.models.config import ModelConfig
from radixlm.models.gguf import convert_gguf, is_gguf_file


def resolve_model_folder(model_path: str, *, weights: bool = True) -> Path:
    """The Hugging Face folder for `model_path`: itself, or the cached conversion of a GGUF file.

    With `weights=False` a GGUF conversion skips the weights (enough for config and tokenizer).
    """
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {model_path!r} does not exist")
    if is_gguf_file(path):
        return convert_gguf(path, weights=weights)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(
            f"{model_path!r} is neither a Hugging Face model folder (config.json and *.safetensors) "
            "nor a GGUF file"
        )
    return path


def load_model_files(model_path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the weights, under Hugging Face names, of a model folder or GGUF file.

    Tensors keep the dtype they are stored in; a GGUF's are dequantized to float32.
    `lm_head.weight` is absent when the embeddings are tied.
    """
    from safetensors.torch import load_file

    folder = resolve_model_folder(model_path)
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        # The index names the shards; other *.safetensors (e.g. a consolidated copy) are not ours.
        shards = set(json.loads(index.read_text())["weight_map"].values())
        files = [folder / shard for shard in sorted(shards)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_path!r} has a config.json but no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        # load_file memory-maps the file; pages are read as the tensors are first touched.
        tensors.update(load_file(str(file)))
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]  # buffers some old checkpoints saved; the model computes its own
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, tensors
