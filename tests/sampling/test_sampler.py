"""The batched sampler against straightforward per-row references."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from radixlm.core.params import SamplingParams
from radixlm.sampling import Sampler, SamplingBatch, compute_logprobs, compute_top_logprobs

GREEDY = SamplingParams(temperature=0.0)


def make_batch(
    params: Sequence[SamplingParams],
    *,
    output_ids: Sequence[list[int]] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    eos_ids: Sequence[tuple[int, ...]] | None = None,
    top_logprobs_num: Sequence[int] | None = None,
    return_logprob: Sequence[bool] | None = None,
    allowed_mask: torch.Tensor | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=list(params),
        output_ids=list(output_ids) if output_ids is not None else [[] for _ in range(n)],
        prompt_ids=list(prompt_ids) if prompt_ids is not None else [[] for _ in range(n)],
        eos_ids=list(eos_ids) if eos_ids is not None else [() for _ in range(n)],
        top_logprobs_num=list(top_logprobs_num) if top_logprobs_num is not None else [0] * n,
        return_logprob=list(return_logprob) if return_logprob is not None else [False] * n,
        allowed_mask=allowed_mask,
    )


def draw(sampler: Sampler, logits_row: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    """n independent samples of one distribution, as batches of identical rows."""
    samples: list[int] = []
    while len(samples) < n:
        rows = min(n - len(samples), max(1, 4_000_000 // logits_row.numel()))
        logits = logits_row.unsqueeze(0).expand(rows, -1).contiguous()
        samples += sampler.sample(logits, make_batch([params] * rows)).next_ids.tolist()
    return samples


def reference_probs(logits_row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Hugging Face's warpers in order (temperature, top-k, top-p, min-p), in float64."""
    x = logits_row.double() / p.temperature
    if 0 < p.top_k < x.numel():
        kth = x.sort(descending=True).values[p.top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        probs = x.softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        remove = torch.zeros_like(probs, dtype=torch.bool)
        remove[order] = before >= p.top_p
        x = x.masked_fill(remove, float("-inf"))
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return x.softmax(-1)


def chi_square(samples: list[int], expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens of nonzero probability, and its degrees of freedom."""
    counts = Counter(samples)
    support = expected_probs.nonzero().flatten().tolist()
    n = len(samples)
    stat = sum(
        (counts[t] - n * expected_probs[t].item()) ** 2 / (n * expected_probs[t].item())
        for t in support
    )
    return stat, len(support) - 1


def chi2_999(dof: int) -> float:
    """The upper 0.1% point of chi-square (Wilson-Hilferty): a correct sampler fails one seed in
    a thousand, and the seeds are fixed, so the tests are deterministic."""
    a = 2 / (9 * dof)
    return dof * (1 - a + 3.09 * a**0.5) ** 3


# --- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = Sampler(seed=0).sample(logits, make_batch([GREEDY] * 16))
    assert out.next_ids.dtype == torch.int64
    assert torch.equal(out.next_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ties_go_to_the_first_index(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(20)
    vocab = 1000  # not a multiple of the argmax block: the last block is short
    logits = torch.randint(0, 4, (8, vocab), generator=gen).to(dtype)  # ties everywhere
    logits[1, -1] = 9  # the best is the very last column
    logits[2, 960:] = 9  # tied bests inside the short block
    logits[3] = float("-inf")
    logits[4, :] = 0
    out = Sampler(seed=0).sample(logits, make_batch([GREEDY] * 8))
    assert torch.equal(out.next_ids, logits.argmax(-1))
    assert out.next_ids[1] == vocab - 1 and out.next_ids[2] == 960 and out.next_ids[3] == 0


def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(top_k=1, temperature=t) for t in (0.5, 1.0, 2.0, 50.0)] * 4
    out = Sampler(seed=0).sample(logits, make_batch(params))
    assert torch.equal(out.next_ids, logits.argmax(-1))


def test_mixed_batch_greedy_rows_are_argmax() -> None:
    logits = torch.randn(12, 500, generator=torch.Generator().manual_seed(2))
    params = [GREEDY if i % 3 == 0 else SamplingParams(temperature=1.5) for i in range(12)]
    out = Sampler(seed=0).sample(logits, make_batch(params))
    greedy_rows = [i for i in range(12) if i % 3 == 0]
    assert torch.equal(out.next_ids[greedy_rows], logits[greedy_rows].argmax(-1))
    assert ((out.next_ids >= 0) & (out.next_ids < 500)).all()


# --- truncation: only allowed tokens, and the allowed set is the reference's ----------------------


def probs_to_logits(probs: Sequence[float], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax puts `probs` on tokens perm[0], perm[1], ... and spreads the rest."""
    head = torch.tensor(probs, dtype=torch.float64)
    rest = (1.0 - head.sum()) / (vocab - len(probs))
    full = torch.cat([head, torch.full((vocab - len(probs),), rest.item(), dtype=torch.float64)])
    # Scatter the head across the vocabulary so different CDF blocks are exercised.
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(vocab))
    return full.log().float()[perm.argsort()], perm


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        # top-k: the k most likely.
        (SamplingParams(top_k=3), {0, 1, 2}),
        # top-p: 0.4 + 0.3 reaches 0.65; 0.2 is not needed.
        (SamplingParams(top_p=0.65), {0, 1}),
        # top-p keeps the token that crosses the line.
        (SamplingParams(top_p=0.75), {0, 1, 2}),
        # top-p after top-k renormalises: top-2 is 4/7 + 3/7, and 4/7 alone reaches 0.5.
        (SamplingParams(top_k=2, top_p=0.5), {0}),
        # min-p 0.4 of the max 0.4: 0.16 and above.
        (SamplingParams(min_p=0.4), {0, 1, 2}),
        (SamplingParams(min_p=0.6), {0, 1}),
        # temperature first: at T=0.5 the probabilities are ~ [.55, .31, .14, .01], so top-p .8
        # takes two and top-p .9 three.
        (SamplingParams(temperature=0.5, top_p=0.8), {0, 1}),
        (SamplingParams(temperature=0.5, top_p=0.9), {0, 1, 2}),
        # top-4 then top-p .9 leaves three; min-p .55 drops the one at half the best.
        (SamplingParams(top_k=4, top_p=0.9, min_p=0.55), {0, 1}),
    ],
)
def test_truncation_only_returns_allowed_tokens(params: SamplingParams, allowed: set[int]) -> None:
    vocab = 1000
    logits, perm = probs_to_logits([0.4, 0.3, 0.2, 0.05], vocab)
    expected = {perm[t].item() for t in allowed}
    assert set(reference_probs(logits, params).nonzero().flatten().tolist()) == expected
    seen = set(draw(Sampler(seed=3), logits, params, 3000))
    assert seen == expected  # never outside, and every allowed token shows up


def test_truncation_matches_reference_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    vocab = 700  # not a multiple of the CDF block
    rows, params = [], []
    for _ in range(40):
        rows.append(torch.randn(vocab, generator=gen) * rng.choice([0.5, 2.0, 5.0]))
        params.append(
            SamplingParams(
                temperature=rng.choice([0.3, 0.7, 1.0, 1.8]),
                top_k=rng.choice([-1, 0, 1, 5, 40, 300, 5000]),
                top_p=rng.choice([1.0, 0.95, 0.8, 0.3]),
                min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
            )
        )
    draws = 100  # each row repeated: one big batch rather than many small ones
    logits = torch.stack(rows).repeat(draws, 1)
    ids = Sampler(seed=4).sample(logits, make_batch(params * draws)).next_ids.view(draws, -1)
    seen = [set(column) for column in ids.T.tolist()]
    for row, p, tokens in zip(rows, params, seen, strict=True):
        probs = reference_probs(row, p)
        assert all(probs[t] > 0 for t in tokens), p
        # The likely tokens all show up (a token of probability 0.1 is missed 100 times in 3e-5).
        assert set((probs > 0.1).nonzero().flatten().tolist()) <= tokens, p


def test_large_nucleus_grows_its_candidates() -> None:
    # A flat distribution: the top-p 0.9 nucleus holds ~90% of 3000 tokens, far past the first
    # candidate set, so the search must widen; every token drawn must still be in the nucleus.
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(5)) * 0.1
    params = SamplingParams(top_p=0.9)
    probs = reference_probs(logits, params)
    assert (probs > 0).sum() > 2400
    samples = draw(Sampler(seed=5), logits, params, 300)
    assert all(probs[t] > 0 for t in samples)


# --- the distribution itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.3, top_k=10),
        SamplingParams(top_p=0.8, min_p=0.02),
    ],
)
def test_distribution_matches_softmax(params: SamplingParams) -> None:
    logits = torch.randn(20, generator=torch.Generator().manual_seed(6))
    expected = reference_probs(logits, params)
    samples = draw(Sampler(seed=6), logits, params, 20_000)
    stat, dof = chi_square(samples, expected)
    assert stat < chi2_999(dof), (stat, dof)


def test_distribution_across_cdf_blocks() -> None:
    # 30 live tokens spread over a 1100-token vocabulary (4 full blocks and a partial one).
    vocab = 1100
    live = torch.randperm(vocab, generator=torch.Generator().manual_seed(7))[:30]
    live[0] = vocab - 1  # the last token of the partial block
    live[1] = 0
    logits = torch.full((vocab,), float("-inf"))
    logits[live] = torch.randn(30, generator=torch.Generator().manual_seed(8))
    expected = reference_probs(logits, SamplingParams())
    samples = draw(Sampler(seed=7), logits, SamplingParams(), 20_000)
    assert set(samples) <= set(live.tolist())
    stat, dof = chi_square(samples, expected)
    assert stat < chi2_999(dof), (stat, dof)


def test_sampler_seed_reproduces_unseeded_rows() -> None:
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(9))
    batch = make_batch([SamplingParams()] * 64)
    a, b = Sampler(seed=11), Sampler(seed=11)
    for _ in range(3):
        assert torch.equal(a.sample(logits, batch).next_ids, b.sample(logits, batch).next_ids)
    assert not torch.equal(
        Sampler(seed=12).sample(logits, batch).next_ids,
        Sampler(seed=11).sample(logits, batch).next_ids,
    )


# --- penalties ----------------------------------------------------------------------------------


def reference_penalised(
    logits_row: torch.Tensor, p: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """Hugging Face's repetition penalty, then OpenAI's frequency and presence penalties."""
    x = logits_row.double().clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= count * p.frequency_penalty + p.presence_penalty
    return x


def test_penalties_match_reference() -> None:
    gen = torch.Generator().manual_seed(10)
    rng = random.Random(10)
    vocab, rows = 64, 300
    logits = torch.randn(rows, vocab, generator=gen)
    params, prompts, outputs = [], [], []
    for _ in range(rows):
        params.append(
            SamplingParams(
                temperature=0.0,
                repetition_penalty=rng.choice([1.0, 0.5, 1.3, 2.0]),
                frequency_penalty=rng.choice([0.0, -1.0, 0.4, 2.0]),
                presence_penalty=rng.choice([0.0, -2.0, 0.3, 1.5]),
            )
        )
        # Histories drawn from the likely tokens, so the penalties move the argmax.
        top = logits[len(prompts)].topk(8).indices.tolist()
        prompts.append([rng.choice(top) for _ in range(rng.randrange(0, 6))])
        outputs.append([rng.choice(top) for _ in range(rng.randrange(0, 10))])
    out = (
        Sampler(seed=0)
        .sample(logits, make_batch(params, prompt_ids=prompts, output_ids=outputs))
        .next_ids
    )
    changed = 0
    for i in range(rows):
        ref = reference_penalised(logits[i], params[i], prompts[i], outputs[i])
        best2 = ref.topk(2).values
        if best2[0] - best2[1] < 1e-4:
            continue  # a float32 near-tie; either answer is right
        assert out[i].item() == ref.argmax().item(), (params[i], prompts[i], outputs[i])
        changed += ref.argmax().item() != logits[i].argmax().item()
    assert changed > rows // 4  # the test really exercises the penalties


def test_sampled_rows_see_penalties() -> None:
    # Token 0 of [3, 0, 0] was generated once: 3 - (2 * 1 + 2) = -1.
    logits = torch.tensor([[3.0, 0.0, 0.0]]).expand(4000, -1).contiguous()
    p = SamplingParams(temperature=1.0, presence_penalty=2.0, frequency_penalty=2.0)
    out = Sampler(seed=0).sample(logits, make_batch([p] * 4000, output_ids=[[0]] * 4000))
    expected = torch.softmax(torch.tensor([3.0 - 4.0, 0.0, 0.0]), -1)
    stat, dof = chi_square(out.next_ids.tolist(), expected.double())
    assert stat < chi2_999(dof)


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(11))
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.5, temperature=0.5, top_p=0.5),
        SamplingParams(frequency_penalty=1.0, min_new_tokens=5),
        GREEDY,
        SamplingParams(temperature=2.0, min_p=0.1),
    ]
    mask = torch.rand(4, 100, generator=torch.Generator().manual_seed(12)) > 0.3
    Sampler(seed=0).sample(
        logits,
        make_batch(
            params,
            prompt_ids=[[1, 2, 3]] * 4,
            output_ids=[[4, 4]] * 4,
            eos_ids=[(2,)] * 4,
            allowed_mask=mask,
            return_logprob=[True] * 4,
        ),
    )
    assert torch.equal(logits, before)


# --- min_new_tokens and the grammar mask ----------------------------------------------------------


def test_min_new_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 9] = 10.0  # eos is by far the best
    logits[:, 8] = 9.0  # and a stop token the second best
    p = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=(8,))
    outputs = [[1], [1, 1], [1, 1, 1]]
    out = Sampler(seed=0).sample(
        logits, make_batch([p] * 3, output_ids=outputs, eos_ids=[(9, 8)] * 3)
    )
    assert all(t not in (8, 9) for t in out.next_ids.tolist()[:2])
    assert out.next_ids.tolist()[2] == 9  # three tokens out: eos is allowed again


def test_min_new_tokens_sampled_rows_never_end() -> None:
    logits = torch.zeros(2000, 5)
    logits[:, 0] = 3.0  # eos is likely
    p = SamplingParams(min_new_tokens=1)
    out = Sampler(seed=0).sample(logits, make_batch([p] * 2000, eos_ids=[(0,)] * 2000))
    assert (out.next_ids != 0).all()
    assert set(out.next_ids.tolist()) == {1, 2, 3, 4}


def test_allowed_mask_is_respected() -> None:
    gen = torch.Generator().manual_seed(13)
    rows, vocab = 64, 300
    logits = torch.randn(rows, vocab, generator=gen) * 3
    mask = torch.rand(rows, vocab, generator=gen) < 0.05
    mask[:, 0] = True  # every row allows something
    params = [GREEDY, SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(top_k=3)] * 16
    sampler = Sampler(seed=13)
    draws = 20
    ids = sampler.sample(
        logits.repeat(draws, 1), make_batch(params * draws, allowed_mask=mask.repeat(draws, 1))
    ).next_ids
    assert mask.repeat(draws, 1)[torch.arange(rows * draws), ids].all()
    greedy = sampler.sample(logits, make_batch([GREEDY] * rows, allowed_mask=mask)).next_ids
    assert torch.equal(greedy, logits.masked_fill(~mask, float("-inf")).argmax(-1))


@pytest.mark.parametrize("vocab", [1000, 1024])
def test_grammar_allowing_fewer_tokens_than_top_k(vocab: int) -> None:
    logits = torch.randn(3000, vocab, generator=torch.Generator().manual_seed(21))
    mask = torch.zeros(3000, vocab, dtype=torch.bool)
    mask[:, [17, vocab - 2]] = True
    params = [SamplingParams(top_k=5), SamplingParams(top_k=5, top_p=0.99)] * 1500
    out = Sampler(seed=0).sample(
        logits, make_batch(params, allowed_mask=mask, top_logprobs_num=[5] * 3000)
    )
    assert set(out.next_ids.tolist()) == {17, vocab - 2}
    assert out.top_ids is not None and ((out.top_ids >= 0) & (out.top_ids < vocab)).all()


def test_allowed_mask_narrower_than_logits_disallows_padding() -> None:
    logits = torch.zeros(500, 12)
    logits[:, 10:] = 5.0  # padding columns past the tokenizer's vocabulary look attractive
    mask = torch.ones(500, 10, dtype=torch.bool)
    ids = Sampler(seed=0).sample(logits, make_batch([SamplingParams()] * 500, allowed_mask=mask))
    assert (ids.next_ids < 10).all()


def test_grammar_that_only_allows_eos_wins_over_min_new_tokens() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(14))
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, 7] = True  # the grammar is complete: only eos may follow
    mask[1, 3] = True  # ...except in row 1, which may still go on
    p = SamplingParams(temperature=0.0, min_new_tokens=10)
    out = Sampler(seed=0).sample(
        logits, make_batch([p, p], eos_ids=[(7,), (7,)], allowed_mask=mask)
    )
    assert out.next_ids.tolist() == [7, 3]


# --- seeds ----------------------------------------------------------------------------------------


def decode(
    sampler: Sampler,
    logits: torch.Tensor,
    params: list[SamplingParams],
    order: list[int],
    steps: int,
) -> list[list[int]]:
    """Run `steps` sampling steps with rows in `order`; returns each original row's tokens."""
    outputs: list[list[int]] = [[] for _ in params]
    for _ in range(steps):
        batch = make_batch(
            [params[i] for i in order],
            output_ids=[outputs[i] for i in order],
            prompt_ids=[[1, 2, 3] for _ in order],
        )
        ids = sampler.sample(logits[order], batch).next_ids.tolist()
        for i, t in zip(order, ids, strict=True):
            outputs[i].append(t)
    return outputs


def test_seeded_row_is_independent_of_its_batch() -> None:
    gen = torch.Generator().manual_seed(15)
    vocab = 2000
    logits = torch.randn(8, vocab, generator=gen) * 0.5  # flat: top-p needs a wide search
    seeded = [
        SamplingParams(sampling_seed=1234, temperature=0.9),
        SamplingParams(sampling_seed=99, top_p=0.9, top_k=1500),
        SamplingParams(sampling_seed=7, top_p=0.95, repetition_penalty=1.3, min_p=0.01),
    ]
    others = [
        SamplingParams(),
        GREEDY,
        SamplingParams(top_k=1800, top_p=0.5),  # forces a different candidate search
        SamplingParams(sampling_seed=5, frequency_penalty=1.0),
        SamplingParams(temperature=1.7, top_k=20),
    ]
    params = seeded + others
    for row in range(len(seeded)):
        alone = decode(Sampler(seed=1), logits[[row]], [params[row]], [0], steps=4)[0]
        order = list(range(len(params)))
        random.Random(row).shuffle(order)
        together = decode(Sampler(seed=2), logits, params, order, steps=4)[row]
        assert alone == together, params[row]


def test_seeds_and_steps_give_different_draws() -> None:
    logits = torch.zeros(1, 1000)
    runs = [
        decode(Sampler(seed=0), logits, [SamplingParams(sampling_seed=s)], [0], steps=8)[0]
        for s in (1, 2, 1)
    ]
    assert runs[0] == runs[2]
    assert runs[0] != runs[1]
    assert len(set(runs[0])) > 4  # the step index moves the draw


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_distribution_logprobs() -> None:
    gen = torch.Generator().manual_seed(16)
    logits = torch.randn(6, 400, generator=gen) * 2
    params = [
        GREEDY,
        SamplingParams(temperature=0.3, top_k=5),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(top_p=0.5),
        GREEDY,
        SamplingParams(min_p=0.2, presence_penalty=1.0),
    ]
    top_n = [0, 3, 5, 0, 1, 2]
    out = Sampler(seed=16).sample(
        logits,
        make_batch(
            params,
            prompt_ids=[[1, 2]] * 6,
            output_ids=[[3]] * 6,
            return_logprob=[True] * 6,
            top_logprobs_num=top_n,
        ),
    )
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.next_ids.unsqueeze(1)).squeeze(1))
    assert out.top_ids.shape == (6, 5)
    top = raw.topk(5)
    for i, k in enumerate(top_n):
        assert out.top_ids[i, :k].tolist() == top.indices[i, :k].tolist()
        torch.testing.assert_close(out.top_logprobs[i, :k], top.values[i, :k])
        values = out.top_logprobs[i, :k].tolist()
        assert values == sorted(values, reverse=True)
        assert (out.top_ids[i, k:] == -1).all() and out.top_logprobs[i, k:].isnan().all()


def test_logprobs_only_for_rows_that_ask() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(17)).bfloat16()
    out = Sampler(seed=0).sample(
        logits,
        make_batch(
            [GREEDY, SamplingParams(), GREEDY, SamplingParams()],
            return_logprob=[False, True, False, False],
            top_logprobs_num=[0, 0, 0, 2],
        ),
    )
    raw = torch.log_softmax(logits.float(), -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.logprobs[[0, 2]].isnan().all()
    torch.testing.assert_close(out.logprobs[1], raw[1, out.next_ids[1]])
    assert out.top_ids.shape == (4, 2)
    assert (out.top_ids[[0, 1, 2]] == -1).all()
    assert out.top_ids[3].tolist() == raw[3].topk(2).indices.tolist()
    torch.testing.assert_close(out.top_logprobs[3], raw[3].topk(2).values)


def test_top_logprobs_found_in_the_last_block() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(22))
    logits[:, 995:] += 10.0  # the best five sit in the short last block
    logits[2, :] = 1.0  # all tied
    out = Sampler(seed=0).sample(
        logits, make_batch([GREEDY] * 3, return_logprob=[True] * 3, top_logprobs_num=[5] * 3)
    )
    raw = torch.log_softmax(logits, -1)
    assert out.top_ids is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.top_logprobs, raw.topk(5).values)
    assert sorted(out.top_ids[0].tolist()) == [995, 996, 997, 998, 999]
    assert len(set(out.top_ids[2].tolist())) == 5  # distinct ids, even among ties
    torch.testing.assert_close(raw.gather(1, out.top_ids), out.top_logprobs)


def test_compute_logprobs_helpers() -> None:
    gen = torch.Generator().manual_seed(18)
    # 40 x 2^19 floats is more than one chunk of the helpers' bounded-memory loop.
    logits = torch.randn(40, 1 << 19, generator=gen)
    ids = torch.randint(0, 1 << 19, (40,), generator=gen)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(compute_logprobs(logits, ids), raw.gather(1, ids[:, None])[:, 0])
    top_ids, top_values = compute_top_logprobs(logits, 4)
    expected = raw.topk(4)
    assert torch.equal(top_ids, expected.indices)
    torch.testing.assert_close(top_values, expected.values)
    with pytest.raises(ValueError, match="k must be >= 1"):
        compute_top_logprobs(logits, 0)


# --- contract -------------------------------------------------------------------------------------


def test_batch_lists_must_match_the_logits() -> None:
    batch = make_batch([GREEDY] * 3)
    with pytest.raises(ValueError, match="one entry per row"):
        Sampler().sample(torch.zeros(4, 10), batch)
    batch.eos_ids.pop()
    with pytest.raises(ValueError, match="one entry per row"):
        Sampler().sample(torch.zeros(3, 10), batch)


def test_row_with_nothing_allowed_still_returns_a_valid_id() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(19))
    mask = torch.zeros(2, 300, dtype=torch.bool)
    out = Sampler(seed=0).sample(logits, make_batch([SamplingParams(), GREEDY], allowed_mask=mask))
    assert ((out.next_ids >= 0) & (out.next_ids < 300)).all()
