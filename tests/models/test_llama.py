"""The Llama-family model over the paged KV pool against Hugging Face transformers, per architecture.

Every architecture is a tiny random-weight folder (tests/conftest.py) that both transformers and
radixlm load. Random weights give near-uniform next-token distributions full of near-ties, so
generated tokens are compared through logprobs, never by exact argmax identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from radixlm.core.plan import ScheduledSeq
from radixlm.engine.engine import Engine
from radixlm.kernels.build import BLAS, blas_sgemm, isa_variants, load_kernels
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.decode import DecodePass
from radixlm.kernels.torch_backend import TorchBackend
from radixlm.models.loader import load_model_files
from radixlm.runner.runner import ModelRunner

# float32 on both sides; the tiny models' logits are ~0.2 in size, and summation order (fused
# projections, paged vs dense attention) moves them by ~1e-7. 1e-5 is far tighter than any real
# error: an off-by-one position or a missing bias moves them by >1e-3.
ATOL = 1e-5
NUM_SLOTS = 512

VARIANTS = {
    "llama": {"arch": "llama"},
    "llama-tied": {"arch": "llama", "tie_word_embeddings": True},
    "qwen2-bias": {"arch": "qwen2"},
    "qwen3-qknorm": {"arch": "qwen3"},  # head_dim 32 != hidden 64 / 4 heads
    # A window far shorter than the prompts: prefills, cached prefixes, multi-token short rows
    # and decodes all reach past it.
    "mistral-window": {"arch": "mistral", "sliding_window": 7},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_model: Callable[..., Path],
) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp(request.param), seed=3, **VARIANTS[request.param]
    )


@pytest.fixture(scope="module")
def hf(folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def runner(folder: Path) -> ModelRunner:
    config, weights = load_model_files(str(folder))
    return ModelRunner(config, weights, torch.device("cpu"), torch.float32, NUM_SLOTS)


@torch.inference_mode()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids])).logits[0].float()


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scattered_slots(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct slot ids in a random order: a request's slots are rarely contiguous."""
    perm = torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(seed)) + 1
    return perm[:n].to(torch.int64)


def seq(
    ids: list[int], start: int, slots: torch.Tensor, logit_from: int | None = None
) -> ScheduledSeq:
    """Feed ids at positions start.. into slots[start:]; logits from logit_from (default start)."""
    return ScheduledSeq(
        ids, start, slots[: start + len(ids)], start if logit_from is None else logit_from
    )


def test_prefill_logits_equal_transformers(hf: Any, runner: ModelRunner) -> None:
    ids = prompt(24)
    got = runner.forward([seq(ids, 0, scattered_slots(24))])
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_prefix_in_the_pool_gives_the_logits_of_a_fresh_prefill(
    hf: Any, runner: ModelRunner
) -> None:
    """A prefill on top of cached K/V (a cache hit), then single-token decodes, match one dense
    forward over the whole sequence."""
    ids = prompt(30, seed=1)
    ref = hf_logits(hf, ids)
    slots = scattered_slots(30, seed=1)
    first = runner.forward([seq(ids[:17], 0, slots)])
    torch.testing.assert_close(first, ref[:17], atol=ATOL, rtol=0)
    rest = runner.forward([seq(ids[17:26], 17, slots)])
    torch.testing.assert_close(rest, ref[17:26], atol=ATOL, rtol=0)
    for pos in range(26, 30):
        step = runner.forward([seq(ids[pos : pos + 1], pos, slots)])
        torch.testing.assert_close(step, ref[pos : pos + 1], atol=ATOL, rtol=0)


def test_long_prefill_on_a_long_prefix_equals_transformers(hf: Any, runner: ModelRunner) -> None:
    """Longer than the attention's query blocks, on both sides of a cache boundary."""
    ids = prompt(330, seed=5)
    ref = hf_logits(hf, ids)
    slots = scattered_slots(330, seed=5)
    first = runner.forward([seq(ids[:140], 0, slots)])
    torch.testing.assert_close(first, ref[:140], atol=ATOL, rtol=0)
    rest = runner.forward([seq(ids[140:], 140, slots)])
    torch.testing.assert_close(rest, ref[140:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["chosen", "torch"])
def test_mixed_batch_equals_separate_forwards(
    hf: Any, folder: Path, runner: ModelRunner, backend: str
) -> None:
    """Two fresh prefills, a prefill on a cached prefix and two decodes in one forward; on the
    backend chosen for the CPU (the compiled kernels where they build) and on the torch backend
    (what other devices run) with a runner of its own."""
    if backend == "torch":
        config, weights = load_model_files(str(folder))
        runner = ModelRunner(
            config, weights, torch.device("cpu"), torch.float32, NUM_SLOTS, backend=TorchBackend()
        )
        assert runner.backend.name == "torch"
    _check_mixed_batch(hf, runner)


def _check_mixed_batch(hf: Any, runner: ModelRunner) -> None:
    a, b, c, d, e = (prompt(n, seed=10 + i) for i, n in enumerate((12, 5, 20, 9, 14)))
    slots = scattered_slots(12 + 5 + 20 + 9 + 14, seed=2)
    sa, sb, sc, sd, se = torch.split(slots, [12, 5, 20, 9, 14])
    # c has 15 tokens cached, d and e all but their last: write those first.
    runner.forward([seq(c[:15], 0, sc), seq(d[:8], 0, sd), seq(e[:13], 0, se)])
    got = runner.forward(
        [
            seq(a, 0, sa),
            seq(c[15:], 15, sc, logit_from=16),  # logits of only the last 4 positions
            seq(b, 0, sb, logit_from=4),
            seq(d[8:], 8, sd),
            seq(e[13:], 13, se),
        ]
    )
    want = torch.cat(
        [
            hf_logits(hf, a),
            hf_logits(hf, c)[16:],
            hf_logits(hf, b)[4:],
            hf_logits(hf, d)[8:],
            hf_logits(hf, e)[13:],
        ]
    )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[Engine]:
    with Engine(str(folder), max_total_tokens=NUM_SLOTS, random_seed=0) as e:
        yield e


def test_engine_greedy_follows_transformers(hf: Any, engine: Engine) -> None:
    """Each greedy token is transformers' argmax up to near-ties, and its logprob matches."""
    ids = prompt(11, seed=4)
    new = 12
    outs = engine.generate(
        input_ids=[ids, ids[:6]],
        sampling_params={"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
    )
    for p, out in zip([ids, ids[:6]], outs, strict=True):
        toks = out["output_ids"]
        assert len(toks) == new
        lp = torch.log_softmax(hf_logits(hf, p + toks), dim=-1)
        rows = lp[len(p) - 1 : -1]
        chosen = rows.gather(1, torch.tensor(toks)[:, None])[:, 0]
        # A chosen token at most ATOL below the best: the argmax, or tied with it.
        assert bool((chosen >= rows.max(-1).values - ATOL).all()), (toks, rows.argmax(-1).tolist())
        meta = out["meta_info"]
        got = torch.tensor([v for v, _, _ in meta["output_token_logprobs"]])
        torch.testing.assert_close(got, chosen, atol=ATOL, rtol=0)
        prompt_lp = torch.tensor([v for v, _, _ in meta["input_token_logprobs"][1:]])
        want = lp[: len(p) - 1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        torch.testing.assert_close(prompt_lp, want, atol=ATOL, rtol=0)
    engine.check_invariant()


# (torch threads, kernel build): the pass splits its work among the threads, unevenly for 3; the
# builds are this CPU's and those other CPUs run (the attention inside differs).
PASS_RUNS = [(1, ()), (2, ()), (3, ())] + [(2, f) for f in list(isa_variants().values())[1:]]


class _LayerByLayer(CpuKernelBackend):
    """The CPU kernels without their decode pass: the layers run one by one."""

    def decode_pass(self, *args: Any, **kwargs: Any) -> None:
        return None


class _CountedPass(CpuKernelBackend):
    """The CPU kernels with the pass's own GEMM at every row count (so every batch of short
    rows takes the pass), counting the calls of their decode pass."""

    calls = 0

    def __init__(self, lib: Any, blas: str | None = None) -> None:
        super().__init__(lib, gemm="stream", blas=blas)

    def decode_pass(self, *args: Any, **kwargs: Any) -> Any:
        run = super().decode_pass(*args, **kwargs)
        assert run is not None
        backend = self

        class Counted:
            def takes(self, tokens: int) -> bool:
                return bool(run.takes(tokens))

            def __call__(self, *args: Any) -> torch.Tensor:
                backend.calls += 1
                return run(*args)

        return Counted()


def _kernel_runners(
    folder: Path, flags: tuple[str, ...], kv_dtype: torch.dtype, blas: str | None = None
) -> tuple[ModelRunner, ModelRunner]:
    """A runner over the `flags` build with the decode pass (its calls counted; its sgemm this
    BLAS's) and one over this CPU's build running the layers one by one; skips where there is
    no decode pass."""
    lib, native = load_kernels(flags), load_kernels()
    if lib is None or native is None or blas_sgemm(blas) is None:
        pytest.skip("no CPU decode pass here (no compiler, or no BLAS)")
    config, weights = load_model_files(str(folder))
    cpu = torch.device("cpu")
    counted = _CountedPass(lib, blas)
    return (
        ModelRunner(config, weights, cpu, torch.float32, NUM_SLOTS, kv_dtype, counted),
        ModelRunner(
            config, weights, cpu, torch.float32, NUM_SLOTS, kv_dtype, _LayerByLayer(native)
        ),
    )


@pytest.mark.parametrize(("threads", "flags"), PASS_RUNS, ids=lambda x: str(x or "native"))
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [(1, 1, 3, 1), (1, 2)], ids=["6 tokens", "3 tokens"])
def test_decode_pass_equals_the_layer_path(
    folder: Path,
    new: tuple[int, ...],
    kv_dtype: torch.dtype,
    threads: int,
    flags: tuple[str, ...],
) -> None:
    """A batch of short rows (decodes, and rows of several new tokens as jump-forward feeds)
    runs every layer in the CPU decode pass; its logits and the K/V it writes equal the
    layer-by-layer path's (itself checked against transformers above), from the same pool.
    Up to 64 tokens the pass's GEMMs stream their weights; more go to sgemm (below)."""
    _check_decode_pass(folder, new, kv_dtype, threads, flags)


@pytest.mark.parametrize("blas", BLAS)
@pytest.mark.parametrize("threads", [2, 3])
def test_decode_pass_over_64_tokens_calls_each_blas(folder: Path, threads: int, blas: str) -> None:
    """Over 64 tokens the pass's GEMMs call the BLAS's sgemm on each thread's columns; with
    OpenBLAS and with MKL the pass equals the layer path."""
    _check_decode_pass(folder, (16, 16, 16, 16, 16), torch.float32, threads, (), blas)


def _check_decode_pass(
    folder: Path,
    new: tuple[int, ...],
    kv_dtype: torch.dtype,
    threads: int,
    flags: tuple[str, ...],
    blas: str | None = None,
) -> None:
    fused_runner, layer_runner = _kernel_runners(folder, flags, kv_dtype, blas)
    pool = layer_runner.pool.k + layer_runner.pool.v
    for c in pool:
        c.fill_(float("nan"))  # a slot nobody writes stays NaN
    lengths = (9, 30, 70, 4)[: len(new)] if len(new) <= 4 else (20, 30, 70, 24, 40)
    prompts = [prompt(n, seed=20 + i) for i, n in enumerate(lengths)]
    slots = torch.split(scattered_slots(sum(lengths), seed=7), list(lengths))
    parts = list(zip(prompts, new, slots, strict=True))
    layer_runner.forward([seq(p[: len(p) - k], 0, s) for p, k, s in parts])
    rows = [seq(p[len(p) - k :], len(p) - k, s) for p, k, s in parts]
    row_slots = torch.cat([s[len(p) - k :] for p, k, s in parts])
    before = [c.clone() for c in pool]
    fused_pool = fused_runner.pool.k + fused_runner.pool.v
    for c, b in zip(fused_pool, before, strict=True):
        c.copy_(b)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = fused_runner.forward(rows)
    finally:
        torch.set_num_threads(saved_threads)
    assert isinstance(fused_runner.backend, _CountedPass)
    assert fused_runner.backend.calls == 1, "the batch must take the decode pass"
    layered = layer_runner.forward(rows)
    # The GEMMs sum in another order than torch's: float32 K/V differ in the last bits, which
    # can round a bfloat16 K/V element to its neighbour (~0.4%) and move logits by ~2e-5.
    atol = ATOL if kv_dtype == torch.float32 else 1e-4
    torch.testing.assert_close(fused, layered, atol=atol, rtol=0)
    for got, want, old in zip(fused_pool, pool, before, strict=True):
        # float32 K/V: the GEMMs' own summing order (sgemm's blocks differ from torch's).
        rtol = 1e-5 if kv_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, atol=1e-6, rtol=rtol, equal_nan=True)
        assert old[:, row_slots].isnan().all() and got[:, row_slots].isfinite().all()


def test_decode_pass_gemms_leave_the_pool_and_residual_alone(folder: Path) -> None:
    """The benchmarks' GEMMs-alone entry to the pass computes nothing else and writes nothing."""
    lib = load_kernels()
    if lib is None or blas_sgemm() is None:
        pytest.skip("no CPU decode pass here (no compiler, or no BLAS)")
    config, weights = load_model_files(str(folder))
    runner = ModelRunner(
        config,
        weights,
        torch.device("cpu"),
        torch.float32,
        NUM_SLOTS,
        backend=CpuKernelBackend(lib),
    )
    decode_pass = runner.model.decode_pass
    assert isinstance(decode_pass, DecodePass)
    pool = runner.pool.k + runner.pool.v
    for c in pool:
        c.normal_()
    before = [c.clone() for c in pool]
    residual = torch.randn(5, config.hidden_size)
    kept = residual.clone()
    out = decode_pass.gemms(residual, runner.pool.k, runner.pool.v)
    assert out.shape == residual.shape and torch.isfinite(out).all()
    assert torch.equal(residual, kept)
    assert all(torch.equal(c, b) for c, b in zip(pool, before, strict=True))
