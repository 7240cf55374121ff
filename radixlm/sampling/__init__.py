"""Sampling: per-request parameters and the batched sampler that turns logits into tokens."""

from __future__ import annotations

from radixlm.sampling.params import GREEDY_TEMPERATURE, SamplingParams
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
