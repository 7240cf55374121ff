"""CPU kernels built at first use: C++ sources next to this file, compiled with the system
compiler into the radixlm cache and called through ctypes. Without a compiler, for tensors they
do not cover, or with `RADIXLM_CPU_KERNELS=0` in the environment, the callers keep their torch
path (the one other devices run)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from radixlm.utils import atomic_write, cache_dir

logger = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).with_name(n) for n in ("row_attention.cpp", "layer_ops.cpp", "decode_layers.cpp")
]
_HEADERS = [Path(__file__).with_name(n) for n in ("cpu_math.h", "layer_ops.h", "row_attention.h")]
_STEM = "cpu_kernels"
_FLAGS = [
    "-O3",
    "-march=native",
    "-fno-trapping-math",
    "-fopenmp",
    "-std=c++17",
    "-shared",
    "-fPIC",
]
_KV_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# The order of radixlm_row_attention_* in row_attention.cpp.
_ARGTYPES: list[type] = [_P, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64]
_ARGTYPES += [ctypes.c_float, _P, ctypes.c_int]
_ROPE_STORE: list[type] = [_P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64]
_ROPE_STORE += [_P, _P, _P, _P, _P, _I64, ctypes.c_int]
_LAYER_OPS: dict[str, list[type]] = {
    "radixlm_rms_norm_f32": [_P, _I64, _P, _P, ctypes.c_float, _P, _I64, _I64, ctypes.c_int],
    "radixlm_silu_mul_f32": [_P, _P, _I64, _I64, ctypes.c_int],
    **{f"radixlm_rope_store_{suffix}": _ROPE_STORE for suffix in ("f32", "bf16")},
    **{f"radixlm_decode_layers_{suffix}": [_P] for suffix in ("f32", "bf16")},
    "radixlm_linear_f32": [_P, _I64, _I64, _P, _I64, _P, _P, ctypes.c_int],
}


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native output is only valid on a CPU that has them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def isa_variants() -> dict[str, tuple[str, ...]]:
    """The extra flags of the builds this CPU can run: its own ("native") and, where it has
    more, the paths other CPUs take: AVX2, and 128-bit vectors as on SSE or NEON (for tests and
    benchmarks; `load_kernels(flags)` builds one)."""
    features = set(_cpu_flags().split())
    variants: dict[str, tuple[str, ...]] = {"native": ()}
    if "avx512f" in features:
        variants["avx2"] = ("-mno-avx512f",)
    if "avx2" in features:
        variants["128-bit"] = ("-mno-avx512f", "-mno-avx2")
    return variants


@functools.cache
def load_kernels(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, compiler, flags and CPU; None if they cannot
    be built. extra_flags (e.g. `-mno-avx512f`) build a variant, as tests do for the paths
    other CPUs take."""
    flags = [*_FLAGS, *extra_flags]
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: the CPU kernels fall back to torch")
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        key = hashlib.sha256(
            "\0".join(
                [
                    *(p.read_text() for p in _SOURCES + _HEADERS),
                    " ".join(flags),
                    version,
                    _cpu_flags(),
                ]
            ).encode()
        ).hexdigest()[:16]
        variant = hashlib.sha256(" ".join(extra_flags).encode()).hexdigest()[:6]
        path = cache_dir() / "kernels" / f"{_STEM}-{variant}-{key}.so"
        if not path.exists():

            def build(tmp: Path) -> None:
                # One translation unit: the attention tiles are compiled once for the
                # standalone kernel and the decode pass.
                unity = "".join(f'#include "{source}"\n' for source in _SOURCES)
                subprocess.run(
                    [compiler, *flags, "-x", "c++", "-", "-o", str(tmp)],
                    input=unity,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )

            atomic_write(path, build)
            # Older sources or another CPU's build of the same variant.
            for stale in path.parent.glob(f"{_STEM}-{variant}-*.so"):
                if stale != path:
                    stale.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        logger.warning("CPU kernels failed to build, using the torch path: %s", detail)
        return None
    for suffix in _KV_SUFFIX.values():
        fn = getattr(lib, f"radixlm_row_attention_{suffix}")
        fn.argtypes, fn.restype = _ARGTYPES, None
    for name, argtypes in _LAYER_OPS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


_enabled = os.environ.get("RADIXLM_CPU_KERNELS", "1") != "0"


def _available() -> bool:
    return _enabled and load_kernels() is not None


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Within this block the callers take their torch path, as without a compiler (tests
    compare the two paths; a model runner decides which row layout it builds when created)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def row_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `row_attention` runs for these tensors (CPU, float32 queries, a covered KV dtype)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype in _KV_SUFFIX
        and _available()
    )


def row_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_kv: torch.Tensor,
    row_spans: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    kernels: ctypes.CDLL | None = None,
) -> None:
    """Fill out [T, H, D] with each short row's causal attention over its slots.

    q [T, H, D] float32; caches head-major [KVH, S, D]; row_kv int64 [B, N] slots per row;
    row_spans int64 [3, B]: each row's first query in q, its number of queries and of keys (its
    queries are the last positions among its keys). Call only where `row_attention_supported`;
    kernels defaults to `load_kernels()`.
    """
    lib = kernels or load_kernels()
    assert lib is not None
    for t in (q, k_cache, v_cache, row_kv, row_spans, out):
        assert t.is_contiguous() and t.device.type == "cpu"
    _, h, d = q.shape
    kvh, slots, _ = k_cache.shape
    b = row_kv.shape[0]
    spans = row_spans.data_ptr()
    step = row_spans.stride(0) * row_spans.element_size()
    getattr(lib, f"radixlm_row_attention_{_KV_SUFFIX[k_cache.dtype]}")(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        row_kv.data_ptr(),
        row_kv.shape[1],
        spans,
        spans + step,
        spans + 2 * step,
        b,
        h,
        kvh,
        d,
        slots * d,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )


def rope_store_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `rope_store` runs for these tensors (CPU, float32, a covered KV dtype)."""
    return row_attention_supported(q, k_cache)


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kernels: ctypes.CDLL | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rotary embedding of q [T, H, D] and k [T, KVH, D] (rotate-half; `sin` carries its
    sign; cos/sin [T, 1, D] or [T, D]), and this step's K/V written at `slots` of each head of
    the pool [KVH, S, D], all in one pass. Each token's heads must be contiguous (q, k, v may be
    views into one fused projection). Returns q [T, H, D] and head-major k, v [KVH, T, D].
    Call only where `rope_store_supported`; kernels defaults to `load_kernels()`."""
    lib = kernels or load_kernels()
    assert lib is not None
    t, h, d = q.shape
    kvh = k.shape[1]
    q, k, v = (x if x.stride(2) == 1 and x.stride(1) == d else x.contiguous() for x in (q, k, v))
    cos, sin = cos.reshape(t, d).contiguous(), sin.reshape(t, d).contiguous()
    for x in (cos, sin, slots, k_cache, v_cache):
        assert x.is_contiguous() and x.device.type == "cpu"
    q_out = torch.empty(t, h, d, dtype=q.dtype)
    k_out = torch.empty(kvh, t, d, dtype=q.dtype)
    v_out = torch.empty(kvh, t, d, dtype=q.dtype)
    getattr(lib, f"radixlm_rope_store_{_KV_SUFFIX[k_cache.dtype]}")(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        t,
        h,
        kvh,
        d,
        q_out.data_ptr(),
        k_out.data_ptr(),
        v_out.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1] * d,
        torch.get_num_threads(),
    )
    return q_out, k_out, v_out


def layer_ops_supported(*tensors: torch.Tensor) -> bool:
    """Whether `rms_norm` and `silu_mul` run for these tensors (CPU, float32)."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _available()
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    kernels: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in one pass; a new tensor. With a
    contiguous `residual` of x's shape, first residual += x (in place) and the norm is of that
    sum. Call only where `layer_ops_supported(x, weight)`; kernels defaults to `load_kernels()`."""
    lib = kernels or load_kernels()
    assert lib is not None and weight.is_contiguous()
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)  # a view when the rows are evenly strided
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.is_contiguous()
        assert residual.dtype == x.dtype and residual.device.type == "cpu"
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.radixlm_rms_norm_f32(
        rows.data_ptr(),
        rows.stride(0),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        eps,
        out.data_ptr(),
        rows.shape[0],
        dim,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: torch.Tensor, kernels: ctypes.CDLL | None = None) -> torch.Tensor:
    """SwiGLU's silu(gate) * up for gate_up [T, 2I] (gate first), in one pass: [T, I].
    Call only where `layer_ops_supported(gate_up)`; kernels defaults to `load_kernels()`."""
    lib = kernels or load_kernels()
    assert lib is not None
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    lib.radixlm_silu_mul_f32(
        gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads()
    )
    return out


class _DecodeArgs(ctypes.Structure):
    """DecodeArgs of decode_layers.cpp, field for field."""

    _fields_ = [
        *((n, _I64) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter")),
        *((n, _P) for n in ("in_norm", "qkv_w", "qkv_b", "q_norm", "k_norm", "o_w")),
        *((n, _P) for n in ("post_norm", "gate_up_w", "down_w", "k_cache", "v_cache")),
        ("head_stride", _I64),
        ("tokens", _I64),
        *((n, _P) for n in ("residual", "out", "cos", "sin", "out_slots", "row_kv")),
        ("row_stride", _I64),
        *((n, _P) for n in ("q_start", "q_len", "kv_len")),
        ("rows", _I64),
        ("sgemm", _P),
        ("num_threads", _I64),
        ("gemms_only", _I64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


@functools.cache
def _sgemm() -> int | None:
    """The address of the BLAS `sgemm_` torch links (MKL), or None. Only MKL is used: it runs
    single-threaded inside another OpenMP region, where a BLAS with its own threads would not."""
    if not torch.backends.mkl.is_available():
        return None
    for lib_path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            fn = ctypes.CDLL(str(lib_path)).sgemm_
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


# Rows up to which `linear` (and the decode pass) stream each weight once instead of calling
# BLAS: kStreamRows in decode_layers.cpp.
STREAM_ROWS = 4


def linear_streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs for x [rows, k] and streams the weight: CPU, float32, 1 to
    STREAM_ROWS rows, k a multiple of 16 (the vector width the kernel assumes at most)."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= STREAM_ROWS
        and weight.shape[1] % 16 == 0
        and layer_ops_supported(x, weight)
        and _sgemm() is not None
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, kernels: ctypes.CDLL | None = None
) -> torch.Tensor:
    """F.linear(x, weight) for x [rows, k] as the decode pass computes its GEMMs: each thread its
    share of the output columns; up to STREAM_ROWS rows stream the weight once at memory speed,
    where BLAS runs far below it (the LM head at 1 row: 4.3 vs 9.7 ms). Call only where
    `linear_streams` or `decode_layers_supported`; kernels defaults to `load_kernels()`."""
    lib = kernels or load_kernels()
    sgemm = _sgemm()
    assert lib is not None and sgemm is not None and weight.is_contiguous()
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    lib.radixlm_linear_f32(
        x.data_ptr(),
        x.shape[0],
        k,
        weight.data_ptr(),
        n,
        y.data_ptr(),
        sgemm,
        torch.get_num_threads(),
    )
    return y


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of the tensors' data pointers."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


class DecodeWeights:
    """A decoder stack's weights for `decode_layers`: per layer, a tensor for each of `names`
    (`qkv_b`, `q_norm` and `k_norm` may be None), all float32, contiguous and on the CPU;
    collected once per model."""

    names = (
        *("in_norm", "qkv_w", "qkv_b", "q_norm", "k_norm"),
        *("o_w", "post_norm", "gate_up_w", "down_w"),
    )

    def __init__(
        self,
        layers: Sequence[dict[str, torch.Tensor | None]],
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        eps: float,
        scale: float,
    ) -> None:
        self.tensors = layers  # keeps what the pointers point at alive
        self.args = _DecodeArgs(
            layers=len(layers),
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            inter=inter,
            eps=eps,
            scale=scale,
        )
        self.arrays = []  # alive as long as args points at them
        for layer in layers:
            assert set(layer) == set(self.names), sorted(set(layer) ^ set(self.names))
        for name in self.names:
            column = [layer[name] for layer in layers]
            present = [t for t in column if t is not None]
            for t in present:
                assert t.dtype == torch.float32 and t.is_contiguous()
                assert t.device.type == "cpu"
            if len(present) < len(column):
                assert not present, f"{name}: every layer has one, or none"
                continue  # a null array: the model has none
            array = _pointers(present)
            self.arrays.append(array)
            setattr(self.args, name, ctypes.cast(array, ctypes.c_void_p))


def decode_layers_supported(x: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether `decode_layers` runs for activations x and this KV pool (CPU, float32
    activations, a covered KV dtype, MKL's sgemm, a head size up to 512)."""
    return row_attention_supported(x, k_cache) and head_dim <= 512 and _sgemm() is not None


def decode_layers(
    weights: DecodeWeights,
    residual: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_slots: torch.Tensor,
    row_kv: torch.Tensor,
    row_spans: torch.Tensor,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    kernels: ctypes.CDLL | None = None,
    gemms_only: bool = False,
) -> torch.Tensor:
    """Every decoder layer over a batch of short rows (no extends) in one call: each token's K/V
    is written at out_slots of each layer's pool and its rows attend as in `row_attention`.
    residual [T, hidden] holds the embeddings and is updated in place; returns the last layer's
    output [T, hidden] (not yet added to the residual). cos / sin [T, 1, D] or [T, D]. Call only
    where `decode_layers_supported`; kernels defaults to `load_kernels()`; torch's thread count
    is used. `gemms_only` runs only the weight GEMMs, as the pass runs them (for benchmarks:
    nothing else is computed or written)."""
    lib = kernels or load_kernels()
    sgemm = _sgemm()
    assert lib is not None and sgemm is not None
    t = residual.shape[0]
    cos, sin = cos.reshape(t, -1).contiguous(), sin.reshape(t, -1).contiguous()
    for x in (residual, cos, sin, out_slots, row_kv, row_spans, *k_caches, *v_caches):
        assert x.is_contiguous() and x.device.type == "cpu"
    out = torch.empty_like(residual)
    args = _DecodeArgs.from_buffer_copy(weights.args)
    k_ptrs, v_ptrs = _pointers(list(k_caches)), _pointers(list(v_caches))
    spans = row_spans.data_ptr()
    step = row_spans.stride(0) * row_spans.element_size()
    args.k_cache, args.v_cache = ctypes.cast(k_ptrs, _P), ctypes.cast(v_ptrs, _P)
    args.head_stride = k_caches[0].shape[1] * k_caches[0].shape[2]
    args.tokens, args.rows, args.row_stride = t, row_kv.shape[0], row_kv.shape[1]
    args.residual, args.out = residual.data_ptr(), out.data_ptr()
    args.cos, args.sin, args.out_slots = cos.data_ptr(), sin.data_ptr(), out_slots.data_ptr()
    args.row_kv = row_kv.data_ptr()
    args.q_start, args.q_len, args.kv_len = spans, spans + step, spans + 2 * step
    args.sgemm = sgemm
    args.num_threads = torch.get_num_threads()
    args.gemms_only = gemms_only
    getattr(lib, f"radixlm_decode_layers_{_KV_SUFFIX[k_caches[0].dtype]}")(ctypes.byref(args))
    return out
