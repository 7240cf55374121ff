"""Sampling a step: the plan's sampled rows become tokens, and owed logprobs are gathered."""

from __future__ import annotations

import torch

from radixlm.core.messages import LogprobEntry
from radixlm.core.plan import SampledReq, ScheduledReq, StepPlan
from radixlm.sampling.sampler import Sampler, SamplingBatch, gather_logprobs


def sample_step(
    sampler: Sampler, plan: StepPlan, logits: torch.Tensor, masks: torch.Tensor | None
) -> list[SampledReq]:
    """One SampledReq per plan entry, from the runner's logits (each entry's rows, in order) and
    the grammar masks of the sampled rows (GrammarManager.fill_masks)."""
    results = [SampledReq() for _ in plan.reqs]
    rows: list[int] = []
    sampled: list[tuple[int, ScheduledReq]] = []
    offset = 0
    for i, s in enumerate(plan.reqs):
        end = offset + s.seq.num_logits
        start, stop = s.prompt_logprobs
        if stop > start:
            _prompt_logprobs(results[i], s, logits[offset:end])
        if s.num_samples:
            rows.extend(range(end - s.num_samples, end))
            sampled.append((i, s))
        offset = end
    if sampled:
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        _sample(sampler, sampled, logits.index_select(0, index), masks, results)
    return results


def _sample(
    sampler: Sampler,
    sampled: list[tuple[int, ScheduledReq]],
    logits: torch.Tensor,
    masks: torch.Tensor | None,
    results: list[SampledReq],
) -> None:
    """Sample every row; a row where a draft token was fed sees the output (and grammar) before
    that token."""
    reqs = [s.req for _, s in sampled for _ in range(s.num_samples)]
    outputs = [
        s.req.output_ids[: len(s.req.output_ids) - (s.num_samples - 1 - k)]
        for _, s in sampled
        for k in range(s.num_samples)
    ]
    batch = SamplingBatch(
        params=[r.params for r in reqs],
        output_ids=outputs,
        prompt_ids=[r.input_ids for r in reqs],
        eos_ids=[r.eos_ids for r in reqs],
        top_logprobs_num=[r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
        return_logprob=[r.return_logprob for r in reqs],
        allowed_mask=masks,
    )
    out = sampler.sample(logits, batch)
    ids = out.next_ids.tolist()
    lps = out.logprobs.tolist() if out.logprobs is not None else None
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    row = 0
    for i, s in sampled:
        res, req = results[i], s.req
        res.tokens = ids[row : row + s.num_samples]
        if req.return_logprob and lps is not None:
            k = req.top_logprobs_num
            for j in range(row, row + s.num_samples):
                res.logprobs.append((lps[j], ids[j]))
                if k and top_ids is not None and top_lps is not None:
                    res.top_logprobs.append(list(zip(top_lps[j][:k], top_ids[j][:k], strict=True)))
        row += s.num_samples


def _prompt_logprobs(res: SampledReq, s: ScheduledReq, logits: torch.Tensor) -> None:
    """Logprobs of the prompt tokens [start, stop) that s's chunk owes; token t is predicted by
    the logits of position t - 1 (row t - 1 - logit_from), token 0 by none."""
    req, (start, stop) = s.req, s.prompt_logprobs
    k = req.top_logprobs_num
    if start == 0:
        res.prompt_logprobs.append((None, req.input_ids[0]))
        if k:
            res.prompt_top_logprobs.append([])
        start = 1
    if stop <= start:
        return
    first = start - 1 - s.seq.logit_from
    targets = req.input_ids[start:stop]
    ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    chosen, top_ids, top_lps = gather_logprobs(logits[first : first + len(targets)], ids, k)
    entries: list[LogprobEntry] = list(zip(chosen.tolist(), targets, strict=True))
    res.prompt_logprobs.extend(entries)
    if k and top_ids is not None and top_lps is not None:
        res.prompt_top_logprobs.extend(
            list(zip(v, t, strict=True))
            for v, t in zip(top_lps.tolist(), top_ids.tolist(), strict=True)
        )
