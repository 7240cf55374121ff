"""Sampling: the batched sampler that turns logits into tokens, and logprobs."""

from radixlm.sampling.sampler import (
    SampleOutput,
    Sampler,
    SamplingBatch,
    compute_logprobs,
    compute_top_logprobs,
)

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplingBatch",
    "compute_logprobs",
    "compute_top_logprobs",
]
