"""Engine arguments: the few knobs a user of SGLang's Engine expects, with the same names."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from radixlm.speculative.config import SpecConfig


@dataclass(frozen=True)
class EngineArgs:
    """How to build an engine; None means "pick a good value for this model and machine"."""

    model_path: str | None = None  # HF folder or .gguf file; None = embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None
    disable_radix_cache: bool = False
    schedule_policy: str = "lpm"
    max_wait_s: float = 10.0  # a request waiting longer is admitted before cache-aware order
    request_timeout: float | None = None  # seconds a request may take before it is aborted
    max_total_tokens: int | None = None  # KV pool size in tokens (wins over mem_fraction_static)
    # Share of the device's available memory (GPU memory, or RAM on the CPU) that the weights
    # and the KV pool take together; None = the pool takes a device-dependent share of the
    # memory left after the weights.
    mem_fraction_static: float | None = None
    chunked_prefill_size: int | None = None  # tokens per forward (prefill chunks + decodes)
    # While requests decode, a step's prefill tokens are capped (by measured step costs) to
    # keep the step near this many milliseconds; 0 (the default): whole chunks always (on, an
    # all-at-once workload measured slower, docs/benchmarks.md).
    target_itl_ms: float = 0.0
    max_running_requests: int | None = None
    context_length: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto" = dtype; "bfloat16" halves KV memory and traffic
    random_seed: int | None = None
    disable_jump_forward: bool = False  # structured output: one decode per forced token (ablation)
    chat_template: str | None = None  # a Jinja file that replaces the model's chat template
    tp_size: int = 1  # tensor-parallel ranks: processes the heads and MLP columns are cut over
    # Speculative decoding without a draft model: ngram (prompt lookup), radix (the radix
    # tree's continuations) or both; None = off.
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int = 8  # the longest draft
    kv_cache_dir: str | None = None  # disk tier under the radix tree (survives restarts)
    kv_disk_size: float = 16.0  # GB of K/V the disk tier keeps (LRU beyond)
    kv_disk_policy: str = "selective"  # evicted nodes written: selective, write_through, off

    def __post_init__(self) -> None:
        for name in ("max_total_tokens", "chunked_prefill_size", "max_running_requests", "tp_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.target_itl_ms < 0:
            raise ValueError(f"target_itl_ms must be >= 0, got {self.target_itl_ms}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}"
            )
        if self.kv_cache_dir is not None and self.tp_size > 1:
            raise ValueError("kv_cache_dir (the disk KV tier) does not support tp_size > 1")
        if self.kv_disk_size <= 0:
            raise ValueError(f"kv_disk_size must be positive, got {self.kv_disk_size}")
        if self.kv_disk_policy not in ("selective", "write_through", "off"):
            raise ValueError(
                "kv_disk_policy must be selective, write_through or off, "
                f"got {self.kv_disk_policy!r}"
            )
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"chat_template {self.chat_template!r} is not a file")
        self.spec_config  # noqa: B018 (validates the speculative arguments)

    @property
    def spec_config(self) -> SpecConfig | None:
        """The speculative-decoding configuration; None when it is off."""
        if self.speculative_algorithm is None:
            return None
        return SpecConfig(self.speculative_algorithm, self.speculative_num_draft_tokens)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict (server_info)."""
        return asdict(self)
