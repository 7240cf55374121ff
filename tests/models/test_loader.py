"""Loading config and weights from Hugging Face folders and GGUF files, against references."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from radixlm.models.config import ModelConfig
from radixlm.models.default import default_model_path
from radixlm.models.gguf import CONFIG_FILES, TOKENIZER_FILES, WEIGHTS_FILE, gguf_cache_path
from radixlm.models.loader import load_model_files


def test_default_model_path_finds_the_embedded_gguf() -> None:
    path = Path(default_model_path())
    assert path.is_file() and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_tiny_hf_folder_round_trip(tiny_model_dir: Path) -> None:
    config, tensors = load_model_files(str(tiny_model_dir))
    expected = load_file(str(tiny_model_dir / "model.safetensors"))
    assert config == ModelConfig.from_hf(json.loads((tiny_model_dir / "config.json").read_text()))
    assert (config.architecture, config.vocab_size, config.num_layers) == ("llama", 49152, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.eos_token_ids == (2,) and not config.tie_word_embeddings
    assert tensors.keys() == expected.keys()
    assert "lm_head.weight" in tensors
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    # Seeded weights with a sensible spread, so model outputs are not degenerate.
    std = tensors["model.layers.0.self_attn.q_proj.weight"].std().item()
    assert 0.015 < std < 0.025


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_variants(tmp_path: Path, make_tiny_model: Callable[..., Path], arch: str) -> None:
    config, tensors = load_model_files(str(make_tiny_model(tmp_path, arch=arch)))
    assert config.architecture == arch
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")
    assert ("model.layers.1.self_attn.q_proj.bias" in tensors) == (arch == "qwen2")
    assert ("model.layers.1.self_attn.k_norm.weight" in tensors) == (arch == "qwen3")
    if arch == "qwen3":
        assert config.head_dim == 32
        assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)


def test_sharded_hf_folder_reads_the_shards_its_index_names(
    tmp_path: Path, make_tiny_model: Callable[..., Path]
) -> None:
    from safetensors.torch import save_file

    folder = make_tiny_model(tmp_path, vocab_size=512)
    expected = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(expected)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, shard_names in shards.items():
        save_file({n: expected[n] for n in shard_names}, str(folder / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(
        {"layers.0.attention.wq.weight": torch.zeros(1)}, str(folder / "consolidated.safetensors")
    )
    _, tensors = load_model_files(str(folder))
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[n], t) for n, t in expected.items())


def test_tied_hf_folder_has_no_lm_head(
    tmp_path: Path, make_tiny_model: Callable[..., Path]
) -> None:
    folder = make_tiny_model(tmp_path, vocab_size=512, tie_word_embeddings=True)
    config, tensors = load_model_files(str(folder))
    assert config.tie_word_embeddings and "lm_head.weight" not in tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_matches_the_weights_it_was_converted_from(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any], arch: str, tied: bool
) -> None:
    path, expected_config, expected = make_tiny_gguf(
        tmp_path / "tiny.gguf", arch=arch, tie_word_embeddings=tied
    )
    config, tensors = load_model_files(str(path))
    assert config == expected_config
    # Exact equality for llama checks that the Q/K rows llama.cpp interleaved are put back.
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], tensor), name


def test_gguf_conversion_is_cached(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any]
) -> None:
    path, _, expected = make_tiny_gguf(tmp_path / "tiny.gguf")
    load_model_files(str(path))
    folder = gguf_cache_path(path)
    assert folder.parent.parent == tmp_cache_dir
    assert all(
        (folder / name).is_file() for name in (*CONFIG_FILES, *TOKENIZER_FILES, WEIGHTS_FILE)
    )
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    # Garble the file but keep its size and mtime (the cache key): a warm load must not read it.
    stat = path.stat()
    path.write_bytes(b"GGUF" + b"\0" * (stat.st_size - 4))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    config, tensors = load_model_files(str(path))
    assert all(torch.equal(tensors[name], t) for name, t in expected.items())

    # A changed file (new mtime) is a new cache entry, converted afresh.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_cache_path(path) != folder
    with pytest.raises(ValueError):
        load_model_files(str(path))


def test_a_new_conversion_replaces_the_stale_one_of_the_same_file(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any]
) -> None:
    """Converting a changed GGUF deletes the earlier conversion of that file, and only that."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path, _, _ = make_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    namesake, _, _ = make_tiny_gguf(tmp_path / "b" / "tiny.gguf")  # same stem, another file
    load_model_files(str(path))
    load_model_files(str(namesake))
    old, other = gguf_cache_path(path), gguf_cache_path(namesake)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_model_files(str(path))
    assert gguf_cache_path(path).is_dir()
    assert not old.exists()
    assert (other / WEIGHTS_FILE).is_file()


def test_bad_paths(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_files(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither"):
        load_model_files(str(tmp_path))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a gguf")
    with pytest.raises(ValueError, match="neither"):
        load_model_files(str(not_gguf))
    folder = make_tiny_model(tmp_path / "model", vocab_size=512)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_model_files(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported"):
        load_model_files(str(folder))


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs for a Llama 3.1 rope_scaling
    (low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)."""
    low, high, old_len = 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 / 3.3, and 3.2
def test_gguf_rope_freqs_become_llama3_rope_scaling(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any], factor: float
) -> None:
    from radixlm.models.layers import RotaryEmbedding

    theta, head_dim = 500000.0, 16
    rope_freqs = llama_cpp_rope_freqs(head_dim, theta, factor)
    assert ((rope_freqs > 1) & (rope_freqs < factor)).any()  # the smoothed band is covered
    path, _, expected = make_tiny_gguf(
        tmp_path / "llama31.gguf", rope_theta=theta, extra_tensors={"rope_freqs.weight": rope_freqs}
    )
    config, tensors = load_model_files(str(path))
    assert config.head_dim == head_dim
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert tensors.keys() == expected.keys()  # rope_freqs is no weight
    # The rotary table turns each frequency as llama.cpp does: divided by its rope_freqs entry.
    rope = RotaryEmbedding(head_dim, 4096, config.rope_theta, config.rope_scaling)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim)) / rope_freqs.astype(np.float64)
    angles = np.outer(np.arange(4096), inv)
    torch.testing.assert_close(
        rope.cos[:, : head_dim // 2].double(), torch.from_numpy(np.cos(angles)), atol=1e-5, rtol=0
    )


def test_gguf_rope_freqs_that_no_llama3_scaling_explains_are_ignored(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any]
) -> None:
    rope_freqs = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    path, _, _ = make_tiny_gguf(
        tmp_path / "odd.gguf", extra_tensors={"rope_freqs.weight": rope_freqs}
    )
    with pytest.warns(UserWarning, match="rope_freqs"):
        config, _ = load_model_files(str(path))
    assert config.rope_scaling is None


@pytest.mark.parametrize(
    ("arch", "error"),
    [("phi2", "unsupported GGUF architecture 'phi2'"), ("llama", "lacks llama.embedding_length")],
)
def test_gguf_with_unsupported_or_incomplete_metadata(
    tmp_path: Path, tmp_cache_dir: Path, arch: str, error: str
) -> None:
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=error):
        load_model_files(str(path))


def test_gguf_weights_load_even_if_its_tokenizer_is_unsupported(
    tmp_path: Path, tmp_cache_dir: Path, make_tiny_gguf: Callable[..., Any]
) -> None:
    from radixlm.tokenizer import Tokenizer

    path, expected_config, _ = make_tiny_gguf(tmp_path / "t5.gguf", tokenizer_model="t5")
    config, _ = load_model_files(str(path))
    assert config == expected_config
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 't5'"):
        Tokenizer.load(str(path))


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path: str) -> None:
    """Dequantization and the Q/K un-permutation, against transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    config, tensors = load_model_files(smollm2_path)
    path = Path(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    reference = model.state_dict()
    hf = model.config

    assert config.tie_word_embeddings and hf.tie_word_embeddings
    assert reference.keys() - tensors.keys() == {"lm_head.weight"}
    assert tensors.keys() <= reference.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        # Bit-identical with transformers 5.x; the tolerance allows other dequantization kernels.
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
        hf.vocab_size,
    )
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
