"""The batched sampler: logits of the requests needing a token in, one token per request out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from radixlm.core.params import SamplingParams

# top-k/top-p thresholds come from the best few candidates of a row (topk is ~10x cheaper than a
# full sort on CPU); a top-p row whose nucleus does not fit grows its candidate set by this factor.
_FIRST_TOP_P_CANDIDATES = 128
_CANDIDATE_GROWTH = 8

# Tokens per block of the two-level inverse CDF.
_CDF_BLOCK = 256

# argmax and topk look at per-block maxima first (a vectorised reduction), then inside the best
# blocks only: on the CPU that beats torch's own argmax and topk over the whole vocabulary.
_ARGMAX_BLOCK = 64
_TOPK_BLOCK = 32

# Rows per log_softmax chunk: bounds the float32 temporary at 64 MiB for long prompts.
_LOGPROB_CHUNK_ELEMENTS = 1 << 24

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling inputs, built by the scheduler each step; row i is row i of the logits."""

    params: list[SamplingParams]
    output_ids: list[list[int]]  # tokens generated so far: penalties, min_new_tokens, seed's step
    prompt_ids: list[Sequence[int]]  # read only for rows with repetition_penalty != 1
    eos_ids: list[tuple[int, ...]]  # ids that would end the row; masked below min_new_tokens
    top_logprobs_num: list[int]  # 0 = none
    return_logprob: list[bool]
    allowed_mask: torch.Tensor | None = None  # bool [B, <=V] from grammars, True = allowed


@dataclass(slots=True)
class SampleOutput:
    """The chosen tokens and, for the rows that asked, their raw-distribution logprobs."""

    next_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B], NaN on rows that did not ask
    top_ids: torch.Tensor | None  # int64 [B, max k], best first, -1 where a row asked for fewer
    top_logprobs: torch.Tensor | None  # float32 [B, max k], NaN where top_ids is -1


class Sampler:
    """Turns next-token logits into tokens; owns the RNG of requests without a sampling_seed."""

    __slots__ = ("device", "_generator")

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed & _MASK64)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        """Pick one token per row of `logits` [B, V], which must be on the sampler's device."""
        num_rows = logits.shape[0]
        params = batch.params
        if not (
            len(params)
            == len(batch.output_ids)
            == len(batch.prompt_ids)
            == len(batch.eos_ids)
            == len(batch.top_logprobs_num)
            == len(batch.return_logprob)
            == num_rows
        ):
            raise ValueError(f"every SamplingBatch list must have one entry per row ({num_rows})")

        work = _process_logits(logits, batch)
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled:
            next_ids = _argmax(work)
        elif len(sampled) == num_rows:
            next_ids = self._sample_rows(work, batch, sampled)
        else:
            # One argmax over every row is cheaper than gathering the greedy rows first.
            next_ids = _argmax(work)
            index = torch.tensor(sampled, device=logits.device)
            next_ids[index] = self._sample_rows(work[index], batch, sampled)

        out = SampleOutput(next_ids=next_ids, logprobs=None, top_ids=None, top_logprobs=None)
        _attach_logprobs(out, logits, batch)
        return out

    def _sample_rows(self, x: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
        """Sample one token from each row of logits `x` [R, V] (read only) of batch rows `rows`."""
        device = x.device
        params = [batch.params[i] for i in rows]
        vocab = x.shape[1]

        x = x.float()
        temperatures = [p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            x = x / torch.tensor(temperatures, device=device).unsqueeze(1)
        probs = torch.softmax(x, dim=-1)

        # Every filter is a per-row logit threshold; a token survives if it reaches all of them.
        # Thresholds (rather than positions in a sort) keep tied tokens together, so a row's
        # result does not depend on how the rest of the batch had its thresholds found.
        filtered = [j for j, p in enumerate(params) if _truncates(p, vocab) or p.min_p > 0]
        if not filtered:
            return _inverse_cdf(probs, self._uniforms(batch, rows, device))
        threshold = torch.full((len(rows),), float("-inf"), device=device)
        top_rows = [j for j in filtered if _truncates(params[j], vocab)]
        if top_rows:
            top_k = [
                p.top_k if 0 < p.top_k < vocab else vocab for p in (params[j] for j in top_rows)
            ]
            top_p = [params[j].top_p for j in top_rows]
            t = _index(top_rows, len(rows), device)
            threshold[t] = _top_k_top_p_threshold(x[t], probs[t], top_k, top_p)
        min_p_rows = [j for j in filtered if params[j].min_p > 0]
        if min_p_rows:
            m = _index(min_p_rows, len(rows), device)
            log_min_p = torch.tensor([params[j].min_p for j in min_p_rows], device=device).log()
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)
            threshold[m] = torch.maximum(threshold[m], x[m].amax(dim=-1) + log_min_p)
        if len(filtered) == len(rows):
            probs = torch.where(x >= threshold.unsqueeze(1), probs, 0.0)
        else:
            f = torch.tensor(filtered, device=device)
            probs[f] = torch.where(x[f] >= threshold[f].unsqueeze(1), probs[f], 0.0)
        return _inverse_cdf(probs, self._uniforms(batch, rows, device))

    def _uniforms(
        self, batch: SamplingBatch, rows: list[int], device: torch.device
    ) -> torch.Tensor:
        """One U[0, 1) float64 per row: seeded rows from (seed, step), others from the generator."""
        u = torch.rand(len(rows), dtype=torch.float64, device=device, generator=self._generator)
        seeded, values = [], []
        for j, i in enumerate(rows):
            seed = batch.params[i].sampling_seed
            if seed is not None:
                seeded.append(j)
                values.append(_seeded_uniform(seed, len(batch.output_ids[i])))
        if seeded:
            u[torch.tensor(seeded, device=device)] = torch.tensor(
                values, dtype=torch.float64, device=device
            )
        return u


def _truncates(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _index(rows: list[int], num_rows: int, device: torch.device) -> slice | torch.Tensor:
    """An index for `rows`; a plain slice when it is every row, so indexing makes no copy."""
    return slice(None) if len(rows) == num_rows else torch.tensor(rows, device=device)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a 2-D `x`, ties to the first index as argmax does."""
    vocab = x.shape[1]
    if vocab < 4 * _ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    block = _block_maxima(x, _ARGMAX_BLOCK).argmax(dim=-1, keepdim=True)
    columns = block * _ARGMAX_BLOCK + torch.arange(_ARGMAX_BLOCK, device=x.device)
    # Past the end of the last block the clamp repeats the last column, which comes first.
    inside = x.gather(1, columns.clamp(max=vocab - 1)).argmax(dim=-1, keepdim=True)
    return (block * _ARGMAX_BLOCK + inside).squeeze(1)


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=-1) for a 2-D float `x`: the values, best first, and their ids."""
    vocab = x.shape[1]
    # Whole blocks only: a short last block would need padding columns, which a row with fewer
    # than k finite values could return as ids.
    if vocab % _TOPK_BLOCK or k * _TOPK_BLOCK * 4 > vocab:
        top = x.topk(k, dim=-1)
        return top.values, top.indices
    # The k best values lie in the k blocks with the best maxima: a block left out has k blocks
    # whose maxima are all at least its own, which are already k values that good.
    blocks = _block_maxima(x, _TOPK_BLOCK).topk(k, dim=-1).indices
    offsets = torch.arange(_TOPK_BLOCK, device=x.device)
    columns = (blocks.unsqueeze(2) * _TOPK_BLOCK + offsets).flatten(1)
    top = x.gather(1, columns).topk(k, dim=-1)
    return top.values, columns.gather(1, top.indices)


def _block_maxima(x: torch.Tensor, block: int) -> torch.Tensor:
    """The maximum of each run of `block` columns of `x` [R, V] (the last run may be short)."""
    num_rows, vocab = x.shape
    full = vocab - vocab % block
    maxima = x[:, :full].view(num_rows, full // block, block).amax(dim=-1)
    if full == vocab:
        return maxima
    return torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)


def compute_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, ids[i]] as float32 [N], in row chunks of bounded memory."""
    return gather_logprobs(logits, ids, 0)[0]


def compute_top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids of each row, best first, and their logprobs: int64 and float32 [N, k]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # The gathered logprob of id 0 is a by-product nobody reads.
    dummy = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    _, top_ids, top_logprobs = gather_logprobs(logits, dummy, k)
    assert top_ids is not None and top_logprobs is not None
    return top_ids, top_logprobs


def gather_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logprobs of `ids` and, if k > 0, the top-k of each row, from one log_softmax pass."""
    k = min(k, logits.shape[-1])
    rows = max(1, _LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    chosen, top_ids, top_values = [], [], []
    for chunk, chunk_ids in zip(logits.split(rows), ids.split(rows), strict=True):
        logprobs = torch.log_softmax(chunk.float(), dim=-1)
        chosen.append(logprobs.gather(1, chunk_ids.unsqueeze(1)).squeeze(1))
        if k > 0:
            values, indices = _topk(logprobs, k)
            top_ids.append(indices)
            top_values.append(values)
    if k == 0:
        return torch.cat(chosen), None, None
    return torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values)


def _process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Apply penalties, min_new_tokens and the grammar mask; returns `logits` itself if none apply."""
    params = batch.params
    repetition = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    penalised = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0
    ]
    too_short = [
        i
        for i, p in enumerate(params)
        if len(batch.output_ids[i]) < p.min_new_tokens and batch.eos_ids[i]
    ]
    mask = batch.allowed_mask
    if not (repetition or penalised or too_short or mask is not None):
        return logits

    # Never edit the caller's tensor: raw logprobs are read from it afterwards. The grammar mask,
    # when there is one, makes the working copy; applying it before the penalties is the same as
    # after, since a penalty leaves -inf at -inf.
    device = logits.device
    num_rows, vocab = logits.shape
    if mask is None:
        work = logits.to(torch.float32, copy=True)
    else:
        mask = mask.to(device=device, non_blocking=True)
        width = mask.shape[1]
        if mask.shape[0] != num_rows or width > vocab:
            raise ValueError(
                f"allowed_mask must be [{num_rows}, <={vocab}], got {list(mask.shape)}"
            )
        work = torch.where(mask, logits[:, :width].float(), float("-inf"))
        if width < vocab:
            # Columns past the grammar's vocabulary are padding the tokenizer cannot produce.
            work = torch.nn.functional.pad(work, (0, vocab - width), value=float("-inf"))

    # Penalties touch only the (row, token) pairs in a row's history, never the whole vocabulary.
    if repetition:
        rows, ids, local = _history_index(
            repetition,
            [chain(batch.prompt_ids[i], batch.output_ids[i]) for i in repetition],
            device,
        )
        if ids.numel() and int(ids.max()) >= work.shape[1]:
            keep = ids < work.shape[1]  # image positions' pad ids (radixlm.core.images)
            rows, ids, local = rows[keep], ids[keep], local[keep]
        penalty = torch.tensor([params[i].repetition_penalty for i in repetition], device=device)
        penalty = penalty[local]
        x = work[rows, ids]
        # CTRL / Hugging Face: shrink positive logits, push negative ones further down. A token
        # seen twice writes the same value twice.
        work[rows, ids] = torch.where(x < 0, x * penalty, x / penalty)

    if penalised:
        rows, ids, local = _history_index(
            penalised, [batch.output_ids[i] for i in penalised], device
        )
        frequency = torch.tensor([params[i].frequency_penalty for i in penalised], device=device)
        presence = torch.tensor([params[i].presence_penalty for i in penalised], device=device)
        # Presence once per distinct token (duplicates write the same value), frequency once per
        # occurrence; every increment of a cell is equal, so the sum is order-independent.
        work[rows, ids] = work[rows, ids] - presence[local]
        work.index_put_((rows, ids), -frequency[local], accumulate=True)

    if too_short:
        rows, ids, local = _history_index(too_short, [batch.eos_ids[i] for i in too_short], device)
        eos_logits = work[rows, ids]
        work[rows, ids] = float("-inf")
        if mask is not None:
            # A grammar that allows nothing but eos wins over min_new_tokens: better a short
            # output than a token from an empty distribution.
            short = torch.tensor(too_short, device=device)
            emptied = torch.isneginf(work[short].amax(dim=-1))[local]
            work[rows, ids] = torch.where(emptied, eos_logits, work[rows, ids])
    return work


def _history_index(
    rows: list[int], token_lists: Sequence[Iterable[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (batch row, token id, position in `rows`) of every token of every listed row."""
    lists = [list(tokens) for tokens in token_lists]
    lengths = torch.tensor([len(tokens) for tokens in lists], device=device)
    local = torch.repeat_interleave(torch.arange(len(lists), device=device), lengths)
    ids = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int64, device=device)
    return torch.tensor(rows, device=device)[local], ids, local


def _top_k_top_p_threshold(
    x: torch.Tensor, probs: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """Per-row logit threshold of top-k, then top-p over the renormalised top-k (Hugging Face order).

    `top_k` holds the vocab size where it is off, `top_p` holds 1.0 where it is off.
    """
    device = x.device
    num_rows, vocab = x.shape
    k_all = torch.tensor(top_k, device=device)
    p_all = torch.tensor(top_p, device=device, dtype=torch.float64)
    threshold = torch.full((num_rows,), float("-inf"), device=device)
    pending = list(range(num_rows))
    finite_k = [k for k in top_k if k < vocab]
    wants_p = any(p < 1.0 for p in top_p)
    candidates = min(vocab, max([_FIRST_TOP_P_CANDIDATES if wants_p else 1, *finite_k]))
    while pending:
        r = _index(pending, num_rows, device)
        k, p = k_all[r], p_all[r]
        values, ids = _topk(x[r], candidates)
        # Masked tokens among the candidates (a grammar allowing fewer than k) carry no mass.
        in_k = torch.arange(candidates, device=device).unsqueeze(0) < k.unsqueeze(1)
        in_k &= values > float("-inf")
        kept = torch.where(in_k, probs[r].gather(1, ids), 0.0).double()
        # Prefix sums only, so a row's threshold does not depend on how many candidates it got.
        cumulative = kept.cumsum(dim=-1)
        has_k = k < vocab
        last_k = (k.clamp(max=candidates) - 1).unsqueeze(1)
        mass = torch.where(has_k, cumulative.gather(1, last_k).squeeze(1), 1.0)
        limit = p * mass
        # The nucleus is the shortest prefix reaching top_p: a token stays while the mass
        # strictly before it is below top_p.
        count = ((cumulative - kept) < limit.unsqueeze(1)).sum(dim=-1)
        count = torch.where(p < 1.0, count, candidates)
        count = torch.minimum(count, k).clamp(min=1, max=candidates)
        found = values.gather(1, (count - 1).unsqueeze(1)).squeeze(1)
        # A top-p row without top-k is settled once its candidates hold top_p of the mass.
        settled = has_k | (p >= 1.0) | (cumulative[:, -1] >= limit) | (candidates == vocab)
        threshold[r] = torch.where(settled, found, threshold[r])
        pending = [i for i, done in zip(pending, settled.tolist(), strict=True) if not done]
        candidates = min(vocab, candidates * _CANDIDATE_GROWTH)
    return threshold


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the token at quantile u[i] of each row's (unnormalised) distribution.

    Two levels: a float64 CDF over blocks of tokens picks the block, then one over that block's
    tokens picks the token. A full-vocabulary scan is sequential on CPU (slow in float64, and in
    float32 it rounds each token's share to a multiple of ~6e-8), while block sums vectorise.
    """
    num_rows, vocab = probs.shape
    full = vocab - vocab % _CDF_BLOCK
    sums = [probs[:, :full].view(num_rows, full // _CDF_BLOCK, _CDF_BLOCK).sum(dim=-1)]
    if full < vocab:
        sums.append(probs[:, full:].sum(dim=-1, keepdim=True))
    block_cdf = torch.cat(sums, dim=1).double().cumsum(dim=-1)
    target = u.unsqueeze(1) * block_cdf[:, -1:]
    block = _search(block_cdf, target)
    before = block_cdf.gather(1, (block - 1).clamp(min=0))
    residual = target - torch.where(block > 0, before, 0.0)
    columns = block * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=vocab - 1))
    inside_cdf = torch.where(columns < vocab, inside, 0.0).double().cumsum(dim=-1)
    ids = block * _CDF_BLOCK + _search(inside_cdf, residual)
    # The clamp only matters for a row with no finite logit (NaN CDF): still return a valid id.
    return ids.squeeze(1).clamp_(max=vocab - 1)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index whose CDF exceeds `target` [R, 1], never past the last index with mass."""
    found = torch.searchsorted(cdf, target, right=True)
    # Rounding can put the target at (or a hair past) the total; the last token with mass is
    # then the answer, and a token of zero mass never is.
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(found, last)


def _seeded_uniform(seed: int, step: int) -> float:
    """A U[0, 1) draw that depends only on (seed, step): splitmix64, counter-based."""
    return (_splitmix64(_splitmix64(seed & _MASK64) + step) >> 11) * 2.0**-53


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _attach_logprobs(out: SampleOutput, logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Fill in the raw-distribution logprobs for the rows that asked for them."""
    num_rows = logits.shape[0]
    wants_top = batch.top_logprobs_num
    asked = [i for i in range(num_rows) if batch.return_logprob[i] or wants_top[i] > 0]
    if not asked:
        return
    device = logits.device
    k = max(wants_top[i] for i in asked)
    if len(asked) == num_rows:
        out.logprobs, out.top_ids, out.top_logprobs = gather_logprobs(logits, out.next_ids, k)
    else:
        index = torch.tensor(asked, device=device)
        chosen, top_ids, top_logprobs = gather_logprobs(logits[index], out.next_ids[index], k)
        out.logprobs = torch.full((num_rows,), float("nan"), device=device)
        out.logprobs[index] = chosen
        if top_ids is not None and top_logprobs is not None:
            out.top_ids = torch.full((num_rows, top_ids.shape[1]), -1, device=device)
            out.top_logprobs = torch.full((num_rows, top_ids.shape[1]), float("nan"), device=device)
            out.top_ids[index] = top_ids
            out.top_logprobs[index] = top_logprobs
    if out.top_ids is not None and out.top_logprobs is not None and min(wants_top) < k:
        short = torch.arange(out.top_ids.shape[1], device=device) >= torch.tensor(
            wants_top, device=device
        ).unsqueeze(1)
        out.top_ids.masked_fill_(short, -1)
        out.top_logprobs.masked_fill_(short, float("nan"))
