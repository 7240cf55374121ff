"""Conversion of a GGUF file into a Hugging Face model folder kept in the cache.

A GGUF holds the config, the tokenizer and the quantized weights in one file, under llama.cpp's
names and layouts. We convert it once into the files of a Hugging Face folder (config.json,
generation_config.json, tokenizer.json, tokenizer_config.json and float32 model.safetensors), so
the loader and the tokenizer read one format, and a second start skips parsing the GGUF metadata
(~4 s for SmolLM2's 49k-token vocabulary) and dequantizing (~2 s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radixlm.utils import atomic_write, cache_dir

if TYPE_CHECKING:
    import gguf
    import tokenizers

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
# Tensors llama.cpp adds that have no Hugging Face weight; rope_freqs carries Llama 3.1's rope
# scaling, which we do not reconstruct.
_IGNORED_TENSORS = {"rope_freqs.weight"}

# llama.cpp's token types (llama_token_type): 3 is CONTROL, 4 is USER_DEFINED.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_GPT2_PRE = ("default", "gpt2", "gpt-2")


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
    config = hf_config(metadata, shapes)
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


def hf_config(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A Hugging Face config.json dict from GGUF metadata and the tensor shapes (torch order)."""
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
    return {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else list(eos_ids),
        "torch_dtype": "float32",
    }


def hf_tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face tokenizer_config.json dict: special tokens, BOS flag and chat template."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    default_bos = metadata.get("tokenizer.ggml.model") == "llama"
    arch = metadata.get("general.architecture")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "model_max_length": metadata.get(f"{arch}.context_length"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def hf_tokenizer(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for a byte-level BPE ("gpt2") vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pre

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError("GGUF tokenizer has a token_type list of the wrong length")
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    pre_type = metadata.get("tokenizer.ggml.pre", "default")

    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            # llama.cpp (and Llama 3's tokenizer.json) look a whole word up before merging.
            ignore_merges=pre_type in _LLAMA3_PRE,
        )
    )
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre_type == "smollm":
        # Digits one by one, then GPT-2's regex: SmolLM2's own tokenizer.json and llama.cpp agree.
        tok.pre_tokenizer = pre.Sequence(
            [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]
        )
    elif pre_type in _LLAMA3_PRE:
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]
        )
    elif pre_type in _QWEN2_PRE:
        tok.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level]
        )
    else:
        if pre_type not in _GPT2_PRE:
            warnings.warn(
                f"unknown GGUF pre-tokenizer {pre_type!r}; splitting text like GPT-2",
                stacklevel=2,
            )
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_id in zip(tokens, types, strict=True)
            if kind_id == _TOKEN_CONTROL
        ]
    )
    # User-defined tokens (like <think>) are matched whole but, unlike control tokens, are text
    # the user should see, so decoding keeps them even when skipping special tokens.
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, types, strict=True)
            if kind_id == _TOKEN_USER_DEFINED
        ]
    )

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tok


def _write_weights(reader: gguf.GGUFReader, config: dict[str, Any], path: Path) -> None:
    """Dequantize every tensor to float32 under its Hugging Face name and save them."""
    import torch
    from gguf.quants import dequantize
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
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if permuted and kind in heads:
            array = _unpermute_rotary(array, heads[kind])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array).copy())
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for a tensor we deliberately drop."""
    if gguf_name in _IGNORED_TENSORS:
        if gguf_name == "rope_freqs.weight":
            warnings.warn(
                "this GGUF has Llama 3.1 rope scaling factors (rope_freqs), which are ignored",
                stacklevel=3,
            )
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


def _f32(value: float) -> float:
    """The shortest decimal of a float32, so 1e-5 stored as float32 reads back as 1e-5."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False)))
