"""Conversion of a GGUF file into a Hugging Face model folder kept in the cache.

A GGUF holds the config, the tokenizer and the quantized weights in one file, under llama.cpp's
names and layouts. We convert it once into the files of a Hugging Face folder (config.json,
generation_config.json, tokenizer.json, tokenizer_config.json and float32 model.safetensors), so
the loader and the tokenizer read one format, and a second start skips parsing the GGUF metadata
(slow for a large vocabulary) and dequantizing. The tokenizer is rebuilt in gguf_tokenizer.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radixlm.models.gguf_tokenizer import hf_tokenizer, hf_tokenizer_config
from radixlm.models.rope import rope_inv_freq
from radixlm.utils import atomic_write, cache_dir

if TYPE_CHECKING:
    import gguf

GGUF_MAGIC = b"GGUF"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHTS_FILE = "model.safetensors"
# In each converted folder: the resolved path of the GGUF it came from.
_SOURCE_FILE = "source_path.txt"
# Part of the cache key: bump it when the conversion's output changes, so stale entries are ignored.
_CONVERTER_VERSION = 1

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp writes Llama 3.1-3.3's rope scaling only as this tensor: each frequency's divisor.
_ROPE_FREQS = "rope_freqs.weight"
# The parameters every Llama 3.x release scales with, besides its factor (the largest divisor).
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_cache_path(path: str | Path) -> Path:
    """The cache folder for a GGUF file, keyed by its resolved path, size and mtime."""
    p = Path(path).resolve()
    stat = p.stat()
    key = f"{p}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{p.stem}-{digest}"


def convert_gguf(path: str | Path, *, weights: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face folder in the cache, unless done, and return it.

    With `weights=True` the folder gets the config and the weights, and the tokenizer files when
    the tokenizer is supported; with `weights=False` the config and the tokenizer files.
    """
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file")
    folder = gguf_cache_path(path)
    wanted = (*CONFIG_FILES, WEIGHTS_FILE) if weights else (*CONFIG_FILES, *TOKENIZER_FILES)
    if all((folder / name).exists() for name in wanted):
        return folder

    import gguf

    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    config = hf_config(
        metadata, shapes, None if rope_freqs is None else _dequantize(rope_freqs).reshape(-1)
    )
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    # The tokenizer files are cheap once the reader has parsed the file, so a weights conversion
    # writes them too and the tokenizer never has to parse the GGUF again. An unsupported
    # tokenizer only fails the conversion that asks for it.
    try:
        tokenizer = hf_tokenizer(metadata)
    except ValueError:
        if not weights:
            raise
    else:
        _write_json(folder / "tokenizer_config.json", hf_tokenizer_config(metadata))
        atomic_write(folder / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    if weights and not (folder / WEIGHTS_FILE).exists():
        _write_weights(reader, config, folder / WEIGHTS_FILE)
    _replace_stale(folder, Path(path).resolve())
    return folder


def _replace_stale(folder: Path, source: Path) -> None:
    """Record which file folder was converted from, and delete earlier conversions of that same
    file (it changed, or the converter did): each holds a full copy of the weights."""
    marker = folder / _SOURCE_FILE
    if not marker.exists():
        atomic_write(marker, lambda tmp: tmp.write_text(str(source)))
    for other in folder.parent.glob(f"{source.stem}-*"):
        try:
            stale = other != folder and (other / _SOURCE_FILE).read_text() == str(source)
        except OSError:
            continue  # being written, or from before markers: left alone
        if stale:
            shutil.rmtree(other, ignore_errors=True)


def hf_config(
    metadata: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
) -> dict[str, Any]:
    """A Hugging Face config.json dict from GGUF metadata, the tensor shapes (torch order) and
    the rope_freqs tensor if the file has one."""
    arch = metadata.get("general.architecture")
    if arch not in _HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_HF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError("GGUF files with a per-layer number of KV heads are not supported")
    if "token_embd.weight" in shapes:
        vocab_size = shapes["token_embd.weight"][0]
    else:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    eos_ids = _eos_token_ids(metadata)
    head_dim = int(get("attention.key_length", hidden // heads))
    theta = _f32(get("rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(metadata, arch)
    if rope_scaling is None and rope_freqs is not None:
        rope_scaling = _llama3_rope_scaling(rope_freqs, head_dim, theta)
    return {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else list(eos_ids),
        "torch_dtype": "float32",
    }


def _write_weights(reader: gguf.GGUFReader, config: dict[str, Any], path: Path) -> None:
    """Dequantize every tensor to float32 under its Hugging Face name and save them."""
    import torch
    from safetensors.torch import save_file

    # llama.cpp interleaves the two rotary halves of each Q and K head for llama-arch models
    # (convert_hf_to_gguf.py, LlamaModel.permute); Qwen models are written unpermuted.
    permuted = config["model_type"] == "llama"
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        array = _dequantize(t)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if permuted and kind in heads:
            array = _unpermute_rotary(array, heads[kind])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array).copy())
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32, in torch's dimension order."""
    from gguf.quants import dequantize

    array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    return array.reshape(tuple(int(d) for d in reversed(t.shape)))


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one that is not a weight (rope_freqs
    becomes the config's rope_scaling)."""
    if gguf_name == _ROPE_FREQS:
        return None
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in the supported models")


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: each head's rows (pair, half) back to (half, pair)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _eos_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """EOS, then end-of-turn and end-of-message ids when the file names them."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return tuple(ids)


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {
        "rope_type": kind,
        "factor": _f32(metadata[f"{arch}.rope.scaling.factor"]),
    }
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(
    rope_freqs: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """The Hugging Face llama3 rope_scaling that llama.cpp computed these per-frequency divisors
    from, or None (with a warning) if the Llama 3 parameters do not reproduce them."""
    factor = _f32(float(rope_freqs.max()))
    if factor == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}
    divisors = rope_inv_freq(head_dim, theta, None) / rope_inv_freq(head_dim, theta, scaling)
    if divisors.shape == rope_freqs.shape and np.allclose(divisors, rope_freqs, rtol=1e-5):
        return scaling
    warnings.warn(
        "this GGUF's rope scaling factors (rope_freqs) match no Llama 3 scaling; they are ignored",
        stacklevel=3,
    )
    return None


def _f32(value: float) -> float:
    """The shortest decimal of a float32, so 1e-5 stored as float32 reads back as 1e-5."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False)))
