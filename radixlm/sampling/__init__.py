"""Sampling: per-request parameters and the batched sampler that turns logits into tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixlm.sampling.params import GREEDY_TEMPERATURE, SamplingParams

if TYPE_CHECKING:
    from radixlm.sampling.sampler import (
        SampleOutput,
        Sampler,
        SamplingBatch,
        compute_logprobs,
        compute_top_logprobs,
    )

__all__ = [
    "GREEDY_TEMPERATURE",
    "SampleOutput",
    "Sampler",
    "SamplingBatch",
    "SamplingParams",
    "compute_logprobs",
    "compute_top_logprobs",
]


def __getattr__(name: str) -> Any:
    # The sampler needs torch; the HTTP process only needs SamplingParams, so it loads lazily.
    if name in __all__:
        from radixlm.sampling import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'radixlm.sampling' has no attribute {name!r}")
