"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV pool."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from radixlm.core.forward import ForwardBatch
from radixlm.kernels.backend import Backend
from radixlm.kernels.decode import DecodePass, DecodeShape
from radixlm.models.config import ModelConfig
from radixlm.models.layers import RMSNorm, RotaryEmbedding, paged_attention


class Attention(nn.Module):
    """Grouped-query attention with a fused qkv projection."""

    def __init__(self, cfg: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        # Tensor parallelism: sums this rank's partial output with the other ranks' in place.
        self.reduce_output: Callable[[torch.Tensor], object] | None = None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, backend) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, backend) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.backend.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, kh, vh = self.backend.rope_store(q, k, v, cos, sin, batch.out_slots, k_cache, v_cache)
        o = paged_attention(q, kh, vh, k_cache, v_cache, batch, self.scale, self.backend)
        out = self.backend.linear(o.reshape(t, self.q_size), self.o_proj.weight)
        if self.reduce_output is not None:
            self.reduce_output(out)
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, cfg: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce_output: Callable[[torch.Tensor], object] | None = None  # as in Attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.backend.linear(x, self.gate_up_proj.weight)
        out = self.backend.linear(self.backend.silu_mul(gate_up), self.down_proj.weight)
        if self.reduce_output is not None:
            self.reduce_output(out)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block."""

    def __init__(self, cfg: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend)

    def forward(
        self,
        x: torch.Tensor | None,
        residual: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous layer's output (None before the first): the residual stream is
        residual + x, carried unsummed so that each add is fused with the norm after it.
        Returns this layer's (x, residual)."""
        if x is None:
            h = self.input_layernorm(residual)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, batch, k_cache, v_cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


# Hugging Face checkpoint names of the projections fused here: (fused name, part index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus the LM head; `forward` returns logits for `batch.logits_index`.
    Its ops are those of `backend`, which also built the batches' short-row layout."""

    def __init__(self, cfg: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.config = cfg
        self.backend = backend
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # False where the layers exchange activations mid-pass (tensor parallelism all-reduces
        # after o_proj and down_proj): decodes then run layer by layer too.
        self.fused_decode = True

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of batch.logits_index; `embeds` replaces the token embeddings (images)."""
        residual = self.embed_tokens(batch.input_ids) if embeds is None else embeds
        residual = self.backend.activations(residual)
        rope = self.rope(batch.positions, residual.dtype)
        x = None
        rows = batch.rows if not batch.extends else None  # short rows only (decodes)
        decode_pass = self.decode_pass if rows is not None else None
        if rows is not None and decode_pass is not None and decode_pass.takes(len(residual)):
            # Every layer in one call.
            cos, sin = rope
            x = decode_pass(residual, cos, sin, batch.out_slots, rows, k_caches, v_caches)
        else:
            for layer, kc, vc in zip(self.layers, k_caches, v_caches, strict=True):
                x, residual = layer(x, residual, rope, batch, kc, vc)
        assert x is not None, "a model has at least one layer"
        idx = batch.logits_index
        x = self.norm(residual[idx] + x[idx])
        return self.backend.linear(x, self.lm_head.weight).float()

    @functools.cached_property
    def decode_pass(self) -> DecodePass | None:
        """The backend's pass over every layer for batches of short rows only, bound to this
        model's weights on first use (after they are loaded); None where it has none, or
        where `fused_decode` is off."""
        if not self.fused_decode:
            return None
        cfg = self.config
        layers: list[dict[str, torch.Tensor | None]] = []
        for layer in cast(list[DecoderLayer], list(self.layers)):
            a, mlp = layer.self_attn, layer.mlp
            layers.append(
                {
                    "in_norm": layer.input_layernorm.weight,
                    "qkv_w": a.qkv_proj.weight,
                    "qkv_b": a.qkv_proj.bias,
                    "q_norm": a.q_norm.weight if a.q_norm is not None else None,
                    "k_norm": a.k_norm.weight if a.k_norm is not None else None,
                    "o_w": a.o_proj.weight,
                    "post_norm": layer.post_attention_layernorm.weight,
                    "gate_up_w": mlp.gate_up_proj.weight,
                    "down_w": mlp.down_proj.weight,
                }
            )
        shape = DecodeShape(
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            inter=cfg.intermediate_size,
            eps=cfg.rms_norm_eps,
            scale=cfg.head_dim**-0.5,
        )
        return self.backend.decode_pass(layers, shape)

    def linear_weights(self) -> list[torch.Tensor]:
        """The decoder layers' linear weights, each [out, in] (the LM head is not one)."""
        return [
            linear.weight
            for layer in cast(list[DecoderLayer], list(self.layers))
            for linear in (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
        ]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up; every parameter is set."""
        params = dict(self.named_parameters(remove_duplicate=False))
        parts: dict[str, list[torch.Tensor | None]] = {}
        loaded: set[str] = set()
        for hf_name, tensor in weights.items():
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            pieces = name.split(".")
            fused = _FUSED.get(pieces[-2]) if len(pieces) >= 2 else None
            if fused is not None:
                fused_name = ".".join([*pieces[:-2], fused[0], pieces[-1]])
                slot = parts.setdefault(fused_name, [None] * (3 if fused[0] == "qkv_proj" else 2))
                slot[fused[1]] = tensor
                if all(p is not None for p in slot):
                    self._copy(params, fused_name, torch.cat(slot))  # type: ignore[arg-type]
                    loaded.add(fused_name)
                continue
            self._copy(params, name, tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    @staticmethod
    def _copy(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        p = params[name]
        if p.shape != tensor.shape:
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(tensor)
