"""Building and loading the CPU kernels: the C++ sources next to this file, compiled with the
system compiler into the radixlm cache (keyed by source, compiler, flags and CPU) and loaded
through ctypes; and the BLAS `sgemm` (OpenBLAS or MKL) that their GEMMs call beyond a few rows."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from radixlm.utils import atomic_write, cache_dir

logger = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).with_name(n)
    for n in ("row_attention.cpp", "extend_attention.cpp", "layer_ops.cpp", "decode_layers.cpp")
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
# The dtypes the kernels read weights and the KV pool in (activations are float32), and the
# suffix of each one's entry points.
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# The order of radixlm_row_attention_* in row_attention.cpp.
_ROW_ATTENTION: list[type] = [_P, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64]
_ROW_ATTENTION += [ctypes.c_float, _I64, _P, ctypes.c_int]
_ROPE_STORE: list[type] = [_P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64]
_ROPE_STORE += [_P, _P, _P, _P, _P, _I64, ctypes.c_int]
_RMS_NORM: list[type] = [_P, _I64, _P, _P, ctypes.c_float, _P, _I64, _I64, ctypes.c_int]
_ARGTYPES: dict[str, list[type]] = {
    **{f"radixlm_row_attention_{suffix}": _ROW_ATTENTION for suffix in SUFFIX.values()},
    **{f"radixlm_rms_norm_{suffix}": _RMS_NORM for suffix in SUFFIX.values()},
    "radixlm_silu_mul_f32": [_P, _P, _I64, _I64, ctypes.c_int],
    **{f"radixlm_rope_store_{suffix}": _ROPE_STORE for suffix in SUFFIX.values()},
    **{f"radixlm_decode_layers_{w}_{kv}": [_P] for w in SUFFIX.values() for kv in SUFFIX.values()},
    **{
        f"radixlm_linear_{suffix}": [_P, _I64, _I64, _P, _I64, _P, _P, ctypes.c_int]
        for suffix in SUFFIX.values()
    },
}


def sanitize_flags() -> tuple[str, ...]:
    """The compiler flags of `RADIXLM_SANITIZE` (e.g. `address`): the kernels built with that
    sanitizer, so that a native read or write out of bounds stops the process with a report.
    Such a library loads only into a process started with the sanitizer's runtime preloaded:
    `scripts/sanitize.sh` runs a command so."""
    mode = os.environ.get("RADIXLM_SANITIZE")
    return (f"-fsanitize={mode}", "-fno-omit-frame-pointer", "-g") if mode else ()


def cpu_flags() -> str:
    """The CPU's feature flags: -march=native output is only valid on a CPU that has them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm),
    so that torch's bfloat16 GEMMs (oneDNN) outrun float32 rather than emulate it."""
    features = set(cpu_flags().split())
    return bool(features & {"avx512_bf16", "amx_bf16", "bf16"})


def isa_variants() -> dict[str, tuple[str, ...]]:
    """The extra flags of the builds this CPU can run: its own ("native") and, where it has
    more, the paths other CPUs take: AVX2, and 128-bit vectors as on SSE or NEON (for tests and
    benchmarks; `load_kernels(flags)` builds one)."""
    features = set(cpu_flags().split())
    variants: dict[str, tuple[str, ...]] = {"native": ()}
    if "avx512f" in features:
        variants["avx2"] = ("-mno-avx512f",)
    if "avx2" in features:
        variants["128-bit"] = ("-mno-avx512f", "-mno-avx2")
    return variants


def unity_source() -> str:
    """The kernels' sources as one translation unit (compiled from stdin with `-x c++ -`): the
    attention tiles are compiled once for the standalone kernel and the decode pass."""
    return "".join(f'#include "{source}"\n' for source in _SOURCES)


@functools.cache
def load_kernels(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, compiler, flags and CPU; None if they cannot
    be built. extra_flags (e.g. `-mno-avx512f`) build a variant, as tests do for the paths
    other CPUs take. Under `RADIXLM_SANITIZE` a build or load that fails raises instead: a run
    meant to check the kernels must not fall back to torch."""
    sanitize = sanitize_flags()
    flags = [*_FLAGS, *sanitize, *extra_flags]
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        if sanitize:
            raise RuntimeError("RADIXLM_SANITIZE is set but no C++ compiler was found")
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
                    cpu_flags(),
                ]
            ).encode()
        ).hexdigest()[:16]
        variant = hashlib.sha256(" ".join((*sanitize, *extra_flags)).encode()).hexdigest()[:6]
        path = cache_dir() / "kernels" / f"{_STEM}-{variant}-{key}.so"
        if not path.exists():

            def build(tmp: Path) -> None:
                subprocess.run(
                    [compiler, *flags, "-x", "c++", "-", "-o", str(tmp)],
                    input=unity_source(),
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
        return open_kernels(path)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        if sanitize:
            raise RuntimeError(f"the {' '.join(sanitize)} kernels: {detail}") from e
        logger.warning("CPU kernels failed to build, using the torch path: %s", detail)
        return None


def open_kernels(path: Path) -> ctypes.CDLL:
    """A built kernels library (`load_kernels` builds one; benchmarks may open another
    checkout's build from its cache to compare), its functions typed."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _ARGTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.radixlm_native_bf16_dot.argtypes, lib.radixlm_native_bf16_dot.restype = [], ctypes.c_int
    for suffix in SUFFIX.values():
        fn = getattr(lib, f"radixlm_extend_attention_{suffix}")
        fn.argtypes = [_P, _P, _P, _I64, _P, _P, *[_I64] * 4, ctypes.c_float, _P, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.radixlm_fma_peak.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.radixlm_fma_peak.restype = ctypes.c_double
    return lib


# The BLAS libraries whose `sgemm` the kernels can call, best first: OpenBLAS from the
# `scipy-openblas32` wheel (32-bit integers, its kernels chosen at run time for the CPU: on Zen 3
# 1.07-1.20x the throughput of MKL's prefill GEMMs, split the same way; docs/benchmarks.md),
# then the MKL that torch links. `RADIXLM_BLAS=openblas|mkl` picks one.
BLAS = ("openblas", "mkl")


@dataclass(frozen=True, slots=True)
class Sgemm:
    """A BLAS `sgemm_` (Fortran convention, 32-bit integers) that runs single-threaded on the
    thread that calls it: the kernels call it on each thread's share of a GEMM's columns."""

    name: str  # for the startup log and /server_info, e.g. "OpenBLAS 0.3.34 (Haswell)"
    address: int


def _openblas() -> Sgemm | None:
    try:
        import scipy_openblas32
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so"))
        address = ctypes.cast(lib.scipy_sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    # One thread a call: its own thread pool would contend with torch's OpenMP threads.
    lib.scipy_openblas_set_num_threads(1)
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    core = lib.scipy_openblas_get_corename().decode()
    version = getattr(scipy_openblas32, "__version__", "")
    version = ".".join(version.split(".")[:3])
    return None if address is None else Sgemm(f"OpenBLAS {version} ({core})".strip(), address)


def _mkl() -> Sgemm | None:
    if not torch.backends.mkl.is_available():
        return None
    for lib_path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            fn = ctypes.CDLL(str(lib_path)).sgemm_
        except (OSError, AttributeError):
            continue
        address = ctypes.cast(fn, ctypes.c_void_p).value
        return None if address is None else Sgemm("MKL", address)
    return None


@functools.cache
def _find_blas(name: str) -> Sgemm | None:
    return {"openblas": _openblas, "mkl": _mkl}[name]()


def blas_sgemm(which: str | None = None) -> Sgemm | None:
    """The `sgemm` the kernels call, or None without a BLAS they can: `which` (one of `BLAS`),
    else `RADIXLM_BLAS` from the environment, else the first of `BLAS` this install has. A BLAS
    with threads of its own would not do (the calls come from inside an OpenMP region), so
    OpenBLAS is set to one thread, and torch's MKL runs single-threaded there already."""
    which = which or os.environ.get("RADIXLM_BLAS") or None
    if which is not None and which not in BLAS:
        raise ValueError(f"RADIXLM_BLAS must be one of {', '.join(BLAS)}; got {which!r}")
    for name in (which,) if which else BLAS:
        found = _find_blas(name)
        if found is not None:
            return found
    return None
