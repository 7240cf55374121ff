"""Shared fixtures: tiny random models (Hugging Face folders and GGUF files) and the embedded SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radixlm.engine.args import EngineArgs
from radixlm.engine.core import EngineCore
from radixlm.models.config import ModelConfig
from radixlm.models.default import default_model_path
from radixlm.models.gguf import convert_gguf

# One thread per process: tests run engines side by side (a server subprocess and the test
# process) on a 2-core machine, and OpenMP teams spinning against each other are far slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

SMOLLM2_VOCAB_SIZE = 49152
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@pytest.fixture(scope="session", autouse=True)
def radixlm_cache_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Point the conversion cache at pytest's own cache, so runs share it and ~/.cache stays clean."""
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    path = cache.mkdir("radixlm") if cache is not None else tmp_path_factory.mktemp("radixlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADIXLM_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def tmp_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty conversion cache for one test (cold starts; nothing left behind)."""
    path = tmp_path / "radixlm-cache"
    monkeypatch.setenv("RADIXLM_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF file."""
    return default_model_path()


@pytest.fixture(scope="session")
def make_tiny_model(radixlm_cache_dir: Path) -> Callable[..., Path]:
    """`write_tiny_model`, for tests (importing conftest breaks once a subfolder has its own)."""
    return write_tiny_model


@pytest.fixture(scope="session")
def make_tiny_gguf() -> Callable[..., tuple[Path, ModelConfig, dict[str, torch.Tensor]]]:
    """`write_tiny_gguf`, for tests."""
    return write_tiny_gguf


@pytest.fixture(scope="session")
def make_sentencepiece_gguf() -> Callable[..., tuple[Any, dict[str, Any]]]:
    """`sentencepiece_gguf_metadata`, for tests."""
    return sentencepiece_gguf_metadata


@pytest.fixture(scope="session")
def sentencepiece_gguf() -> tuple[Any, dict[str, Any]]:
    """A trained SentencePiece processor and its GGUF tokenizer metadata (see
    `sentencepiece_gguf_metadata`)."""
    return sentencepiece_gguf_metadata()


@pytest.fixture
def gguf_tokenizer_metadata() -> dict[str, Any]:
    """The tokenizer metadata of the tiny GGUF, as `GGUFReader` field contents."""
    return tiny_gguf_tokenizer_metadata()


@pytest.fixture(scope="session")
def tiny_model_dir(radixlm_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny random-weight Llama folder with the SmolLM2 tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_core(tiny_model_dir: Path) -> Callable[..., EngineCore]:
    """Build fresh engine cores over the tiny model: EngineArgs as keywords (by default a pool
    of 1,024 slots and seed 0)."""

    def build(**args: Any) -> EngineCore:
        args = {"max_total_tokens": 1024, "random_seed": 0, **args}
        return EngineCore(EngineArgs(model_path=str(tiny_model_dir), **args))

    return build


def tiny_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny model; qwen2 gets q/k/v biases, qwen3 qk-norm and head_dim 32."""
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": SMOLLM2_VOCAB_SIZE,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "qwen3":
        # Deliberately not hidden_size // num_attention_heads, to catch code that assumes it.
        config.update(head_dim=32, attention_bias=False)
    config.update(overrides)
    return config


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights (std 0.02, norms near 1) under Hugging Face names."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.02 * torch.randn(*shape, generator=gen)

    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
    w = {"model.embed_tokens.weight": randn(config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = randn(h, mean=1.0)
        w[p + "self_attn.q_proj.weight"] = randn(q_rows, h)
        w[p + "self_attn.k_proj.weight"] = randn(kv_rows, h)
        w[p + "self_attn.v_proj.weight"] = randn(kv_rows, h)
        w[p + "self_attn.o_proj.weight"] = randn(h, q_rows)
        if config.attention_bias:
            w[p + "self_attn.q_proj.bias"] = randn(q_rows)
            w[p + "self_attn.k_proj.bias"] = randn(kv_rows)
            w[p + "self_attn.v_proj.bias"] = randn(kv_rows)
        if config.qk_norm:
            w[p + "self_attn.q_norm.weight"] = randn(hd, mean=1.0)
            w[p + "self_attn.k_norm.weight"] = randn(hd, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = randn(h, mean=1.0)
        w[p + "mlp.gate_proj.weight"] = randn(inter, h)
        w[p + "mlp.up_proj.weight"] = randn(inter, h)
        w[p + "mlp.down_proj.weight"] = randn(h, inter)
    w["model.norm.weight"] = randn(h, mean=1.0)
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = randn(config.vocab_size, h)
    return w


def write_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a complete tiny Hugging Face model folder (weights, config, SmolLM2 tokenizer) to `path`."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tiny_weights(ModelConfig.from_hf(config), seed), str(path / "model.safetensors"))
    tokenizer_files = convert_gguf(default_model_path(), weights=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files / name, path / name)
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


TINY_GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]


def tiny_gguf_tokenizer_metadata() -> dict[str, Any]:
    """Tokenizer metadata of a small byte-level vocabulary: 3 control tokens, 256 bytes, 4 merges."""
    tokens = TINY_GGUF_SPECIALS + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in TINY_GGUF_MERGES]
    types = [3] * len(TINY_GGUF_SPECIALS) + [1] * (len(tokens) - len(TINY_GGUF_SPECIALS))
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(TINY_GGUF_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        ),
    }


# A few lines of English, accents, CJK, digits and indentation to train a SentencePiece model on.
SPM_CORPUS = [
    "The radix tree keeps the KV cache of every prefix that requests share.",
    "A request that finishes inserts its prompt and output; the next turn reuses them.",
    "Least recently used leaves are evicted first, and running requests lock their path.",
    "Continuous batching mixes prefill chunks with decodes in one forward pass.",
    "Grüße aus Köln, ça va? naïve café. 你好，世界。",
    "In 2024 there were 366 days; pi is 3.14159 and e is 2.71828.",
    "def add(a, b):\n    return a + b  # the sum\n",
    "    indented   text\twith tabs  and  double  spaces",
]


def sentencepiece_gguf_metadata(add_space_prefix: bool = True) -> tuple[Any, dict[str, Any]]:
    """A small SentencePiece BPE model trained like Llama 2's (byte fallback, digits split, no
    normalization), and the GGUF tokenizer metadata llama.cpp's converter writes for it."""
    import io

    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 4),
        model_writer=proto,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        add_dummy_prefix=add_space_prefix,
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte.
    types = [
        2
        if sp.is_unknown(i)
        else 3
        if sp.is_control(i)
        else 5
        if sp.is_unused(i)
        else 6
        if sp.is_byte(i)
        else 1
        for i in range(n)
    ]
    return sp, {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.chat_template": (
            "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
            "{{ eos_token }}{% endfor %}"
        ),
    }


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, applied to Q and K of llama models."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    tokenizer_model: str | None = None,
    tokenizer: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    **overrides: Any,
) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """Write a tiny float32 GGUF as llama.cpp's converter would; returns it, its config and weights.

    `tokenizer` is its tokenizer metadata (default: `tiny_gguf_tokenizer_metadata()`), with
    `tokenizer_model` in place of its model name if given; `extra_tensors` are written as they
    are (like rope_freqs); `overrides` go to the config.json the weights are made from
    (`tie_word_embeddings=True`, ...).
    """
    import gguf

    tok = tokenizer or tiny_gguf_tokenizer_metadata()
    hf = tiny_config(arch, vocab_size=len(tok["tokenizer.ggml.tokens"]), **overrides)
    config = ModelConfig.from_hf(hf)
    weights = tiny_weights(config, seed)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model(tokenizer_model or tok["tokenizer.ggml.model"])
    writer.add_token_list(tok["tokenizer.ggml.tokens"])
    writer.add_token_types(tok["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    for key, add in [
        ("pre", writer.add_tokenizer_pre),
        ("merges", writer.add_token_merges),
        ("scores", writer.add_token_scores),
        ("unknown_token_id", writer.add_unk_token_id),
        ("add_bos_token", writer.add_add_bos_token),
        ("add_space_prefix", writer.add_add_space_prefix),
    ]:
        if f"tokenizer.ggml.{key}" in tok:
            add(tok[f"tokenizer.ggml.{key}"])
    writer.add_chat_template(tok["tokenizer.chat_template"])

    gguf_names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in weights.items():
        stem, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        if not stem.startswith("model.layers."):
            gguf_name = f"{gguf_names[stem]}.{suffix}"
        else:
            _, _, layer, module = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{gguf_names[module]}.{suffix}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_heads if module == "self_attn.q_proj" else config.num_kv_heads
                array = llama_cpp_permute(array, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    for gguf_name, array in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, config, weights


@pytest.fixture(scope="session")
def tiny_server_model(
    make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny random model the server tests and the chaos suite serve, with a context longer
    than their KV pool (server.server_harness.TINY_CONTEXT)."""
    from server.server_harness import TINY_CONTEXT

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=TINY_CONTEXT
    )


@pytest.fixture(scope="session")
def tiny_llava_dir(radixlm_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA (CLIP tower, 16 image tokens) folder."""
    from image_helpers import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
