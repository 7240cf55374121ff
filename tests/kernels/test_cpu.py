"""The compiled CPU kernels' ops against float64 references and against the torch backend's,
for this CPU's build and the builds other CPUs run."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest
import torch

from radixlm.core.forward import ExtendSeq, KernelRowLayout, TorchRowLayout
from radixlm.core.plan import ScheduledSeq
from radixlm.kernels.build import BLAS, blas_sgemm, isa_variants, load_kernels, unity_source
from radixlm.kernels.cpu import CpuKernelBackend
from radixlm.kernels.decode import STREAM_ROWS
from radixlm.kernels.torch_backend import TorchBackend, apply_rope
from radixlm.models.layers import RotaryEmbedding, extend_attention
from radixlm.runner.runner import build_batch

pytestmark = pytest.mark.skipif(
    load_kernels() is None, reason="no C++ compiler to build the CPU kernels"
)

CPU = torch.device("cpu")


def _backend(flags: tuple[str, ...] = (), blas: str | None = None) -> CpuKernelBackend:
    """The kernels built with these extra flags, as a backend (calling this BLAS's sgemm)."""
    lib = load_kernels(flags)
    assert lib is not None
    return CpuKernelBackend(lib, blas=blas)


# The BLAS libraries this install has for the kernels' sgemm (OpenBLAS and torch's MKL).
HERE_BLAS = [name for name in BLAS if blas_sgemm(name) is not None]


def _rows(
    lengths: list[tuple[int, int]], num_slots: int, gen: torch.Generator, window: int | None = None
):
    """ScheduledSeqs with `start` cached tokens and `n` new ones each, on scattered slots, and
    their rows as the kernel reads them."""
    seqs = []
    for start, n in lengths:
        slots = torch.randperm(num_slots, generator=gen)[: start + n] + 1
        seqs.append(ScheduledSeq([1] * n, start, slots, start))
    rows = build_batch(seqs, _backend(), CPU, window).rows
    assert isinstance(rows, KernelRowLayout)
    return rows, seqs


def _torch_rows(seqs, window=None):
    """The rows as the torch backend pads them, however many queries each has (its runner
    takes only rows of up to MAX_ROW_QUERIES: longer ones are extends there)."""
    backend = TorchBackend()
    backend.max_row_queries = max(len(s.new_ids) for s in seqs)
    rows = build_batch(seqs, backend, CPU, window).rows
    assert isinstance(rows, TorchRowLayout)
    return rows


def _dense(q, k_cache, v_cache, seqs, scale, window=None):
    """Each row's causal attention in float64 over its gathered K/V; with a sliding window, a
    query sees itself and the window - 1 keys before it."""
    outs, offset = [], 0
    h = q.shape[1]
    for seq in seqs:
        n = len(seq.new_ids)
        k = k_cache[:, seq.kv_slots].double()  # [KVH, L, D]
        v = v_cache[:, seq.kv_slots].double()
        g = h // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)  # [H, L, D]
        qs = q[offset : offset + n].double().transpose(0, 1) * scale  # [H, n, D]
        scores = qs @ k.transpose(1, 2)
        pos = torch.arange(seq.start, seq.end)[:, None]
        keys = torch.arange(seq.end)[None, :]
        hidden = (keys > pos) | ((keys <= pos - window) if window else False)
        scores = scores.masked_fill(hidden, float("-inf"))
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
        offset += n
    return torch.cat(outs)


CASES = [
    # heads, kv heads, head dim, rows as (cached tokens, new tokens)
    (9, 3, 64, [(1, 1), (63, 1), (64, 1), (200, 1)]),
    (4, 4, 128, [(5, 16), (100, 3), (65, 1)]),
    (8, 2, 64, [(40, 3), (130, 1), (2, 3)]),  # query tiles of 4 and 2 heads
    (8, 2, 24, [(7, 2), (129, 16), (1, 1)]),  # a head size without a specialised path
    (6, 1, 32, [(300, 5)]),
    # Rows up to a block of keys (the kernels' max_row_queries): short prompts, short turns.
    (9, 3, 64, [(0, 64), (100, 40), (5, 17), (70, 1)]),
    (8, 2, 128, [(0, 33), (63, 64), (1, 1)]),
]


# The build for this CPU, and those of the paths other CPUs take (AVX2, 128-bit vectors).
VARIANTS = list(isa_variants().values())
COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(
    COMPILER is None or platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 compiler"
)
@pytest.mark.parametrize("march", ["sapphirerapids", "x86-64-v3", "x86-64-v2"])
def test_kernels_compile_for_other_x86_cpus(march: str) -> None:
    """The kernels compile to machine code for x86 CPUs other than this one, which no build
    here can run: AVX-512 with AVX512-BF16 (the 16-lane tiles, native bfloat16 dot products,
    the vectors kept in AVX-512's registers), AVX2 + FMA, and SSE's 128-bit vectors. A wrong
    asm constraint or an intrinsic of the wrong width fails here, not on a user's machine."""
    assert COMPILER is not None
    built = subprocess.run(
        [COMPILER, "-O2", f"-march={march}", "-fopenmp", "-std=c++17"]
        + ["-x", "c++", "-", "-S", "-o", os.devnull],
        input=unity_source(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-4000:]


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "kvh", "d", "lengths"), CASES)
def test_kernel_equals_dense_attention(kv_dtype, h, kvh, d, lengths, flags) -> None:
    gen = torch.Generator().manual_seed(h * d + len(lengths))
    num_slots = 700
    k_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    v_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    rows, seqs = _rows(lengths, num_slots, gen)
    q = torch.randn(sum(len(s.new_ids) for s in seqs), h, d, generator=gen) * 3
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    _backend(flags).row_attention(q, k_cache, v_cache, rows, scale, out)
    ref = _dense(q, k_cache, v_cache, seqs, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    if kv_dtype == torch.float32:  # the torch backend computes in the KV dtype: compare in fp32
        torch_backend = TorchBackend()
        padded = _torch_rows(seqs)
        want = torch.empty_like(q)
        torch_backend.row_attention(q, k_cache, v_cache, padded, scale, want)
        torch.testing.assert_close(out, want)


EXTEND_CASES = [
    # heads, kv heads, head dim, extends as (cached tokens, new tokens, leading slots shared with
    # the last extend before it that has a cached prefix, a shared slot then made its own)
    (9, 3, 64, [(0, 1, 0, None)]),
    (9, 3, 64, [(7, 5, 0, None)]),  # a block whose first keys some queries do not see yet
    (9, 3, 64, [(0, 97, 0, None)]),  # a tile and a part of one
    (9, 3, 64, [(33, 300, 0, None)]),
    (8, 2, 128, [(1200, 70, 0, None)]),
    (4, 4, 64, [(0, 200, 0, None)]),
    (6, 1, 128, [(400, 3, 0, None)]),
    # A few-shot step: fresh prompts and questions after one cached prefix, whole or in part
    (
        9,
        3,
        64,
        [
            (0, 40, 0, None),
            (1200, 60, 0, None),
            (1200, 60, 1200, None),
            (0, 17, 0, None),
            (1100, 20, 1100, None),  # 34 blocks and a part of one shared
            (1250, 33, 1100, None),  # the prefix shared, then its own
        ],
    ),
    (9, 3, 64, [(96, 20, 0, None), (96, 20, 96, 40)]),  # equal first slots, a block apart
]


def _extends(specs, num_slots, gen):
    """ExtendSeqs after `cached` tokens each, on scattered slots; an extend's first `shared`
    slots are the last cached extend's before it (one of them, `alter`, replaced)."""
    free = iter((torch.randperm(num_slots, generator=gen) + 1).tolist())
    extends, last, q_start = [], None, 0
    for prefix, t, shared, alter in specs:
        slots = torch.tensor([next(free) for _ in range(prefix + t)])
        if shared:
            slots[:shared] = last.kv_slots[:shared]
        if alter is not None:
            slots[alter] = next(free)
        extends.append(ExtendSeq(q_start, t, prefix, slots))
        q_start += t
        if prefix:
            last = extends[-1]
    return extends


# The extend attention's 16-lane code (AVX-512's) built for any CPU, in narrower instructions.
EXTEND_VARIANTS = [*VARIANTS, ("-DRADIXLM_EXTEND_WIDTH=16",)]


@pytest.mark.parametrize("flags", EXTEND_VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "kvh", "d", "specs"), EXTEND_CASES)
def test_extend_attention_equals_dense_attention(kv_dtype, h, kvh, d, specs, flags) -> None:
    """A step's extends in one call: a fresh one over this step's K/V, one after a cached prefix
    over its slots of the pool (the prefix blocks extends share gathered once), each against
    float64 and within 3x torch's fused attention's error (float32 sums in another order)."""
    gen = torch.Generator().manual_seed(len(specs) * d + specs[0][1])
    num_slots = 6000
    k_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    v_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    extends = _extends(specs, num_slots, gen)
    t = sum(e.q_len for e in extends)
    q = torch.randn(t + 3, h, d, generator=gen) * 3  # 3 more tokens: not the extends'
    kh, vh = (torch.randn(kvh, t + 3, d, generator=gen) for _ in range(2))
    scale = d**-0.5
    backend = _backend(flags)
    layout = backend.extend_layout(extends, None)
    assert layout is not None
    out = torch.full_like(q, float("nan"))
    assert backend.extend_attention(q, kh, vh, k_cache, v_cache, layout, scale, out)
    assert out[t:].isnan().all()  # nothing written past the extends' rows
    for e in extends:
        rows = slice(e.q_start, e.q_start + e.q_len)
        if e.prefix_len == 0:
            k, v = kh[:, rows], vh[:, rows]
        else:
            k, v = k_cache[:, e.kv_slots].float(), v_cache[:, e.kv_slots].float()
        seq = ScheduledSeq([1] * e.q_len, e.prefix_len, torch.arange(e.prefix_len + e.q_len), 0)
        ref = _dense(q[rows], k, v, [seq], scale)
        torch.testing.assert_close(out[rows].double(), ref, atol=1e-5, rtol=1e-5)
        fallback = extend_attention(q[rows], k, v, e.prefix_len, scale)
        error = (out[rows].double() - ref).abs().max().item()
        assert error <= max(3 * (fallback.double() - ref).abs().max().item(), 2e-6)


def test_extend_attention_in_groups_that_fit_its_scratch() -> None:
    """A step whose gathered K/V would overflow the kernel's scratch goes through in groups of
    extends, with the same result: in a build whose scratch holds 45 blocks of 32 keys (3 KV
    heads of 64), the few-shot case's cached extends go one by one, its fresh ones together."""
    h, kvh, d, specs = EXTEND_CASES[-2]
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(kvh, 6001, d, generator=gen) for _ in range(2))
    extends = _extends(specs, 6000, gen)
    t = sum(e.q_len for e in extends)
    q = torch.randn(t, h, d, generator=gen)
    kh, vh = (torch.randn(kvh, t, d, generator=gen) for _ in range(2))
    outs = []
    for flags in [(), (f"-DRADIXLM_EXTEND_SCRATCH_FLOATS={45 * 2 * 32 * 64 * kvh}",)]:
        backend = _backend(flags)
        layout = backend.extend_layout(extends, None)
        assert layout is not None
        outs.append(torch.full_like(q, float("nan")))
        assert backend.extend_attention(q, kh, vh, k_cache, v_cache, layout, d**-0.5, outs[-1])
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_extend_layout_groups_fresh_and_cached_extends() -> None:
    """Fresh extends read this step's K/V at their own tokens, cached ones their slots in turn;
    a sliding window leaves every extend to torch."""
    gen = torch.Generator().manual_seed(0)
    extends = _extends(
        [(0, 4, 0, None), (5, 3, 0, None), (0, 2, 0, None), (2, 6, 0, None)], 99, gen
    )
    layout = _backend().extend_layout(extends, None)
    assert layout is not None and layout.fresh is not None and layout.cached is not None
    assert layout.fresh.seqs.tolist() == [[0, 4, 0, 0], [7, 2, 0, 7]]
    assert layout.fresh.slots.tolist() == list(range(15))
    assert layout.cached.seqs.tolist() == [[4, 3, 5, 0], [9, 6, 2, 8]]
    want = torch.cat([extends[1].kv_slots, extends[3].kv_slots])
    assert layout.cached.slots.tolist() == want.tolist()
    assert _backend().extend_layout(extends, 4096) is None
    assert TorchBackend().extend_layout(extends, None) is None


def test_extend_attention_leaves_other_head_sizes_to_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 2, 24), torch.randn(2, 4, 24)
    backend = _backend()
    layout = backend.extend_layout(_extends([(0, 4, 0, None)], 9, gen), None)
    assert layout is not None
    out = torch.full_like(q, float("nan"))
    assert not backend.extend_attention(q, k, k, k, k, layout, 0.2, out)
    assert out.isnan().all()


WINDOW_CASES = [
    # heads, kv heads, head dim, window, rows as (cached tokens, new tokens)
    (9, 3, 64, 1, [(1, 1), (40, 1), (7, 3)]),  # each query sees itself only
    (8, 2, 64, 8, [(1, 1), (7, 1), (8, 1), (200, 1), (5, 16), (90, 16)]),
    (4, 4, 128, 100, [(99, 1), (100, 1), (163, 5), (300, 16), (30, 4)]),  # unaligned first key
    (8, 2, 24, 64, [(64, 1), (129, 16), (2, 3)]),  # a head size without a specialised path
    (8, 2, 64, 8, [(0, 64), (30, 50), (9, 1)]),  # rows of up to a block of keys
    (4, 4, 128, 100, [(10, 64), (200, 33)]),
]


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "kvh", "d", "window", "lengths"), WINDOW_CASES)
def test_kernel_with_a_sliding_window_equals_dense_attention(
    kv_dtype, h, kvh, d, window, lengths, flags
) -> None:
    gen = torch.Generator().manual_seed(window + d)
    num_slots = 700
    k_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    v_cache = torch.randn(kvh, num_slots + 1, d, generator=gen).to(kv_dtype)
    rows, seqs = _rows(lengths, num_slots, gen, window)
    q = torch.randn(sum(len(s.new_ids) for s in seqs), h, d, generator=gen) * 3
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    _backend(flags).row_attention(q, k_cache, v_cache, rows, scale, out)
    ref = _dense(q, k_cache, v_cache, seqs, scale, window)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    if kv_dtype == torch.float32:
        torch_backend = TorchBackend()
        padded = _torch_rows(seqs, window)
        want = torch.empty_like(q)
        torch_backend.row_attention(q, k_cache, v_cache, padded, scale, want)
        torch.testing.assert_close(out, want)


def test_kernel_ignores_other_slots_and_padding() -> None:
    """Slots outside a row (and the padded tail of its slot list) never change its output."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(2, 301, 64, generator=gen)
    v_cache = torch.randn(2, 301, 64, generator=gen)
    rows, seqs = _rows([(10, 2), (250, 1)], 300, gen)
    q = torch.randn(3, 4, 64, generator=gen)
    backend = _backend()
    first = torch.empty_like(q)
    backend.row_attention(q, k_cache, v_cache, rows, 0.125, first)
    used = torch.zeros(301, dtype=torch.bool)
    for seq in seqs:
        used[seq.kv_slots] = True
    k_cache[:, ~used] = 1e4
    v_cache[:, ~used] = float("nan")
    second = torch.empty_like(q)
    backend.row_attention(q, k_cache, v_cache, rows, 0.125, second)
    assert torch.equal(first, second)


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize(("rows", "dim"), [(1, 8), (7, 576), (300, 64), (3000, 33)])
def test_rms_norm_equals_the_torch_norm(rows: int, dim: int, flags: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(rows + dim)
    x = torch.randn(rows, dim, generator=gen) * 5
    weight = torch.randn(dim, generator=gen)
    xd = x.double()
    ref = weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    backend = _backend(flags)
    out = backend.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
    # Rows that are not contiguous with each other (a head view of a fused projection).
    wide = torch.randn(rows, 3, dim, generator=gen)
    heads = wide[:, 1:]
    expected = backend.rms_norm(heads.contiguous(), weight, 1e-6)
    assert torch.equal(backend.rms_norm(heads, weight, 1e-6), expected)
    # With a residual: the sum, in place, then its norm, exactly as the add and norm apart.
    residual = torch.randn(rows, 2, dim, generator=gen)
    total = residual + heads
    out, summed = backend.add_rms_norm(heads, residual, weight, 1e-6)
    assert summed is residual and torch.equal(residual, total)
    assert torch.equal(out, backend.rms_norm(total, weight, 1e-6))


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize(("rows", "inter"), [(1, 5), (32, 1536), (500, 40)])
def test_silu_mul_equals_torch(rows: int, inter: int, flags: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(rows * inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 30  # far into both tails
    gd = gate_up.double()
    ref = torch.nn.functional.silu(gd[:, :inter]) * gd[:, inter:]
    out = _backend(flags).silu_mul(gate_up)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t", "h", "kvh", "d"), [(1, 9, 3, 64), (37, 4, 4, 128), (3000, 2, 1, 24)])
def test_rope_store_equals_the_torch_backend(t, h, kvh, d, kv_dtype, flags) -> None:
    """Rotated q, head-major k/v and the pool after the write equal the torch backend's
    (apply_rope + index_copy_) exactly (same roundings), for views into a fused projection;
    other slots are untouched."""
    gen = torch.Generator().manual_seed(t + h * d)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen) * 4
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    rope = RotaryEmbedding(d, 4096, 10000.0, None)
    cos, sin = rope(torch.randint(0, 4096, (t,), generator=gen), torch.float32)
    slots = torch.randperm(t + 50, generator=gen)[:t] + 1
    pool = [torch.randn(kvh, t + 51, d, generator=gen).to(kv_dtype) for _ in range(2)]
    caches = [c.clone() for c in pool + pool]  # K, V written by the kernel; K, V by torch
    got = _backend(flags).rope_store(q, k, v, cos, sin, slots, caches[0], caches[1])
    want = TorchBackend().rope_store(q, k, v, cos, sin, slots, caches[2], caches[3])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    # apply_rope is the rotate-half rotation: check it once against float64.
    x, c, s = q.double(), cos.double(), sin.double()
    ref = x * c + torch.cat([x[..., d // 2 :], x[..., : d // 2]], -1) * s
    torch.testing.assert_close(apply_rope(q, cos, sin).double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not HERE_BLAS, reason="no BLAS sgemm here")
@pytest.mark.parametrize("blas", HERE_BLAS)
@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: " ".join(f) or "native")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("rows", "k"),
    [(r, 96) for r in (0, 1, 2, 3, 4, 5, 6, 13, 16, 17, 40, 64, 65, 300)]
    + [(r, 1552) for r in (1, 4, 13, 64, 65)],
)
def test_linear_equals_torch(
    rows: int, k: int, threads: int, flags: tuple[str, ...], blas: str
) -> None:
    """Up to 64 rows stream the weight four output columns at a time (here with a tail of 3
    columns and threads' shares of uneven size), in tiles of 3 or 4 rows (one tile up to 4
    rows, a shorter last one), a row longer than 768 floats in chunks whose sums are added;
    more rows go to the BLAS's sgemm, each thread on its columns. Both equal the float64 product
    within float32's rounding, and no rows give an empty result. `linear`, the op a model calls,
    equals it too. A streamed row's result is the same bits as that row alone."""
    gen = torch.Generator().manual_seed(rows * 10 + threads + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(203, k, generator=gen)
    backend = _backend(flags, blas)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = backend.stream_linear(x, w)
        op = backend.linear(x, w)
    finally:
        torch.set_num_threads(saved)
    want = torch.nn.functional.linear(x.double(), w.double()).float()
    tol = 1e-5 * k / 96  # float32 sums of k products
    torch.testing.assert_close(got, want, atol=tol, rtol=1e-5)
    torch.testing.assert_close(op, want, atol=tol, rtol=1e-5)
    if 0 < rows <= STREAM_ROWS:
        alone = torch.cat([backend.stream_linear(x[i : i + 1], w) for i in range(rows)])
        assert torch.equal(got, alone)
